"""Odd things in the export folder never stop or loop the daemon."""

from __future__ import annotations

import os
import time
from pathlib import Path

from appliance.journal.journal import Journal
from appliance.v1 import scoring_pb2 as pb
from bench.daemon_run import process_tree

from .conftest import drop, free_port, png_bytes


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
    st = poison.stat()
    # What three crashed starts leave behind: the input journaled, never finished, counted three times.
    journal = Journal(d.root / "data" / "journal.sqlite3")
    reg = journal.register(
        source="folder",
        path=str(poison),
        file_name="poison.png",
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        content_hash="0" * 64,
    )
    for _ in range(3):
        journal.count_attempt([reg.input.id])
    journal.close()
    d.start()
    drop(d.incoming, "healthy.png", png_bytes(81))
    results = {r.file_name: r for r in d.collect(2)}
    assert results["poison.png"].rejection.code == "repeated_crash"
    assert results["healthy.png"].outcome == pb.OUTCOME_SCORED
    deadline = time.monotonic() + 10
    while not list(d.rejected.glob("*-poison.png.reason.txt")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "repeated_crash" in next(d.rejected.glob("*-poison.png.reason.txt")).read_text()


def test_a_queued_input_that_wedges_its_worker_never_holds_up_the_stop(make_daemon) -> None:
    """A FIFO put in place of a queued input: the worker's open() waits for a writer in the kernel, where no
    signal of its own reaches it. The stop ends that worker after its grace and exits 0; the input stays queued."""
    d = make_daemon()
    d.incoming.mkdir(parents=True)
    fifo = d.incoming / "queued.dcm"
    os.mkfifo(fifo)
    st = fifo.stat()
    journal = Journal(d.root / "data" / "journal.sqlite3")
    journal.register(
        source="folder",
        path=str(fifo),
        file_name="queued.dcm",
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        content_hash="1" * 64,
    )
    journal.close()
    d.start()
    assert d.proc is not None
    deadline = time.monotonic() + 60
    while not any(_opening_a_fifo(pid) for pid in process_tree(d.proc.pid)):
        assert time.monotonic() < deadline, d.log()[-3000:]
        time.sleep(0.1)
    assert d.stop() == 0, d.log()[-3000:]
    assert "stopping took longer" not in d.log()
    journal = Journal(d.root / "data" / "journal.sqlite3")
    try:
        assert journal.counts().queued == 1  # scored at the next start (or set aside after several)
    finally:
        journal.close()


def _opening_a_fifo(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
    except OSError:
        return False
