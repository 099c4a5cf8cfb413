"""Odd things in the export folder never stop or loop the daemon."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

from appliance.journal.journal import Journal
from appliance.v1 import scoring_pb2 as pb
from tests.processes import alive, decode_workers
from tests.waiting import eventually

from .conftest import Daemon, drop, free_port, png_bytes


def _left_in_flight(d: Daemon, path: Path, content_hash: str, starts: int = 0) -> None:
    """``path`` journaled from the folder and never finished, as a crash leaves it, found unfinished by ``starts``
    starts already."""
    st = path.stat()
    journal = Journal(d.root / "data" / "journal.sqlite3")
    reg = journal.register(
        source="folder",
        path=str(path),
        file_name=path.name,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        content_hash=content_hash,
    )
    for _ in range(starts):
        journal.count_attempt([reg.input.id])
    journal.close()


def test_fifo_symlink_loop_and_latin1_name_do_not_stop_ingest(make_daemon) -> None:
    metrics_port = free_port()
    d = make_daemon(server={"metrics_port": metrics_port})
    d.incoming.mkdir(parents=True)
    os.mkfifo(d.incoming / "pipe.dcm")  # opening it for reading would block forever
    os.symlink(d.incoming / "loop-a", d.incoming / "loop-b")
    os.symlink(d.incoming / "loop-b", d.incoming / "loop-a")
    # Found by the same start-up rescan as the FIFO and the loop, and offered after them (in name order,
    # once the same stability check has passed on all): any of them taken is in the stages before it.
    (d.incoming / "zz-marker.png").write_bytes(png_bytes(72))
    d.start()
    latin1 = os.fsencode(d.incoming) + b"/M\xfcller.png"
    with open(latin1, "wb") as f:
        f.write(png_bytes(70))
    drop(d.incoming, "after.png", png_bytes(71))
    results = {r.file_name: r for r in d.collect(3)}
    assert set(results) == {"M\ufffdller.png", "after.png", "zz-marker.png"}
    assert all(r.outcome == pb.OUTCOME_SCORED for r in results.values())
    status = d.settled(metrics_port)  # a FIFO opened for reading would hold it in flight for good
    counts = (status.scored, status.rejected, status.duplicates, status.queue_depth, status.last_sequence)
    assert counts == (3, 0, 0, 0, 3)  # the FIFO and the loop were never taken as inputs


def test_an_input_unfinished_at_several_starts_is_set_aside(make_daemon) -> None:
    d = make_daemon()
    d.incoming.mkdir(parents=True)
    poison = d.incoming / "poison.png"
    poison.write_bytes(png_bytes(80))
    # What three crashed starts leave behind: the input journaled, never finished, counted three times.
    _left_in_flight(d, poison, "0" * 64, starts=3)
    d.start()
    drop(d.incoming, "healthy.png", png_bytes(81))
    results = {r.file_name: r for r in d.collect(2)}
    assert results["poison.png"].rejection.code == "repeated_crash"
    assert results["healthy.png"].outcome == pb.OUTCOME_SCORED
    eventually(lambda: list(d.rejected.glob("*-poison.png.reason.txt")), "poison.png's reason set aside", timeout=10)
    assert "repeated_crash" in next(d.rejected.glob("*-poison.png.reason.txt")).read_text()


def test_an_input_that_wedges_its_worker_never_holds_up_the_stop(make_daemon) -> None:
    """Every decode worker stopped (SIGSTOP: it answers nothing but SIGKILL, as one wedged in native code), then a
    file dropped: the stop ends the workers after their grace and exits 0; the file is scored at the next start."""
    metrics_port = free_port()
    d = make_daemon(server={"metrics_port": metrics_port})
    d.start()
    assert d.proc is not None
    workers = decode_workers(d.proc.pid)
    assert workers, d.log()[-3000:]  # started before the daemon serves (the pool is warmed)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    drop(d.incoming, "held.png", png_bytes(90))
    eventually(lambda: _in_flight(metrics_port), "held.png in flight", context=lambda: d.log()[-3000:])
    assert d.stop() == 0, d.log()[-3000:]
    assert "stopping took longer" not in d.log()
    assert not any(alive(pid) for pid in workers)
    d.start()
    (result,) = d.collect(1)
    assert (result.file_name, result.outcome) == ("held.png", pb.OUTCOME_SCORED)
    assert d.stop() == 0


def test_a_fifo_in_place_of_a_queued_input_is_refused_at_once(make_daemon) -> None:
    """A FIFO put in place of a journaled input: opening it for reading would wait for a writer, in the kernel,
    where nothing ends it. It is refused as file_vanished at once, the next file is scored, and the stop exits 0."""
    d = make_daemon()
    d.incoming.mkdir(parents=True)
    fifo = d.incoming / "queued.dcm"
    os.mkfifo(fifo)
    _left_in_flight(d, fifo, "1" * 64)
    d.start()
    drop(d.incoming, "after.png", png_bytes(91))
    results = {r.file_name: r for r in d.collect(2)}
    assert results["queued.dcm"].rejection.code == "file_vanished"
    assert results["after.png"].outcome == pb.OUTCOME_SCORED
    assert d.stop() == 0, d.log()[-3000:]


def _in_flight(metrics_port: int) -> bool:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return "appliance_inputs_in_flight 1.0" in text.splitlines()
