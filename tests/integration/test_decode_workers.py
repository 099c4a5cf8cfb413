"""Decode worker processes: one killed mid-burst costs no file, none outlives a killed daemon, and no hostile file
leaves an input in flight or holds up the stop."""

from __future__ import annotations

import os
import signal
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from appliance.journal.journal import Journal
from appliance.scheduling import FEEDER_NICE
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from bench.daemon_run import process_tree
from tests.imaging import hostile
from tests.processes import alive, decode_workers, parent
from tests.waiting import eventually

from .conftest import drop, free_port, jpeg_bytes, png_bytes

BURST = 40


def _workers(daemon_pid: int) -> list[int]:
    """The decode workers: the forkserver's children (the daemon's own children are the forkserver and
    multiprocessing's resource tracker)."""
    return [p for p in process_tree(daemon_pid)[1:] if parent(p) != daemon_pid]


def test_a_decode_worker_killed_mid_burst_costs_no_file(make_daemon) -> None:
    d = make_daemon(inference={"threads": 1, "decode_workers": 2, "max_delay_ms": 2})
    d.start()
    assert d.proc is not None
    names = [f"w-{n:03d}.png" for n in range(BURST)]
    half = BURST // 2
    for n, name in enumerate(names[:half]):
        drop(d.incoming, name, png_bytes(3000 + n, size=1024, bit16=True))
    first = d.collect(2, timeout=60)
    workers = _workers(d.proc.pid)
    assert workers, "no decode worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    # The rest of the burst after the kill: a worker that had already decoded its share of the first half
    # dies idle, and only the next file handed to the pool can notice it (before, this raced the burst).
    for n, name in enumerate(names[half:], start=half):
        drop(d.incoming, name, png_bytes(3000 + n, size=1024, bit16=True))

    results = d.collect(BURST, timeout=120)
    counts = Counter(r.file_name for r in results)
    assert set(counts) == set(names) and max(counts.values()) == 1
    assert all(r.outcome == pb.OUTCOME_SCORED for r in results), [
        (r.file_name, r.rejection.code) for r in results if r.outcome != pb.OUTCOME_SCORED
    ]
    assert first[0].SerializeToString() == results[0].SerializeToString()
    assert "a decode worker process died" in d.log()
    assert "the workers are replaced" not in d.log()  # ordinary files never make a worker be recycled
    assert d.status().scored == BURST


def _scored_one(make_daemon):
    """A daemon with its decode workers up: it has scored one file."""
    d = make_daemon()
    d.start()
    assert d.proc is not None
    drop(d.incoming, "first.png", png_bytes(11, size=128))
    assert d.collect(1, timeout=60)[0].outcome == pb.OUTCOME_SCORED
    return d


def test_decode_workers_leave_with_a_killed_daemon(make_daemon) -> None:
    d = _scored_one(make_daemon)
    helpers = process_tree(d.proc.pid)[1:]
    assert helpers, "the daemon started no worker processes"
    d.kill()
    eventually(
        lambda: [p for p in helpers if alive(p)], "the helpers gone", until=lambda left: not left, timeout=10, every=0.2
    )
    assert not any(alive(p) for p in helpers), [p for p in helpers if alive(p)]


def test_decode_workers_killed_while_idle_cost_nothing(make_daemon) -> None:
    """The OOM killer or an admin's kill between files: the next file finds the pool broken, renews it."""
    d = _scored_one(make_daemon)
    workers = _workers(d.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    # Reaped: the pool's manager, which waits on its workers, has seen them die (with nothing pending).
    eventually(
        lambda: [pid for pid in workers if Path(f"/proc/{pid}").exists()],  # gone, not just a zombie
        "the killed workers reaped",
        until=lambda left: not left,
        timeout=30,
    )
    names = [f"after-{n}.png" for n in range(5)]
    for n, name in enumerate(names):
        drop(d.incoming, name, png_bytes(20 + n, size=128))
    results = d.collect(6, timeout=60)
    assert sorted(r.file_name for r in results[1:]) == names
    assert all(r.outcome == pb.OUTCOME_SCORED for r in results)
    assert "a decode worker process died" in d.log()


def _in_flight(metrics_port: int) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return [line for line in text.splitlines() if line.startswith("appliance_inputs_in_flight ")]


def _heavy_dicom() -> bytes:
    """80 Mpixel of 16-bit native pixels under an honest header: its decode needs well over 400 MiB."""
    ds = hostile.image_header(8944, 8944, None, BitsStored=12, HighBit=11)
    ds.PixelData = (np.arange(8944 * 8944, dtype=np.uint32) % 4093).astype(np.uint16).tobytes()
    return hostile.save(ds)


def test_hostile_codestreams_and_a_memory_cap_leave_nothing_in_flight_and_stop_cleanly(make_daemon) -> None:
    """The security probe: a JPEG claiming 30000 x 30000 under a 64 x 64 header, two sent together by Score and
    two dropped together (with a file past the workers' memory cap), then a normal PNG. Before, the JPEGs took
    each worker to its cap, the in-flight count stuck at 1 and SIGTERM waited 40 s to exit 1."""
    metrics_port = free_port()
    d = make_daemon(server={"metrics_port": metrics_port}, limits={"worker_memory_mb": 400})
    d.start()
    assert d.proc is not None
    jpeg = hostile.jpeg_claiming((30000, 30000))
    answers: dict[str, pb.Result] = {}

    def score(name: str, data: bytes) -> None:
        with d.channel() as ch:
            answers[name] = pb_grpc.ScoringStub(ch).Score(pb.ScoreRequest(image=data, file_name=name), timeout=120)

    # distinct contents (one byte of the preamble), so none is a duplicate of another
    senders = [threading.Thread(target=score, args=(f"sent-{n}.dcm", bytes([n]) + jpeg[1:])) for n in (1, 2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    dropped = {"dropped-3.dcm": bytes([3]) + jpeg[1:], "dropped-4.dcm": bytes([4]) + jpeg[1:]}
    dropped["heavy.dcm"] = _heavy_dicom()
    for name, data in dropped.items():
        drop(d.incoming, name, data)
    results = {r.file_name: r for r in d.collect(5, timeout=180)}
    score("normal.png", png_bytes(5))

    assert set(answers) | set(results) == {"sent-1.dcm", "sent-2.dcm", "normal.png", *dropped}
    for name in ("sent-1.dcm", "sent-2.dcm", "dropped-3.dcm", "dropped-4.dcm"):
        result = answers.get(name) or results[name]
        assert result.rejection.code == "codestream_mismatch", (name, result.rejection.message)
        assert result.rejection.message == (
            "Frame 1's JPEG codestream gives 30000 x 30000 pixels, 1 sample per pixel, 8 bits; "
            "the DICOM header gives 64 x 64 pixels, 1 sample per pixel, 8 bits allocated."
        )
    assert results["heavy.dcm"].rejection.code == "decode_out_of_memory"
    assert answers["normal.png"].outcome == pb.OUTCOME_SCORED
    assert "the workers are replaced" in d.log()
    status = d.settled(metrics_port)
    assert _in_flight(metrics_port) == ["appliance_inputs_in_flight 0.0"]
    assert (status.scored, status.rejected, status.queue_depth) == (1, 5, 0)

    assert d.stop() == 0
    assert "stopping took longer" not in d.log()
    journal = Journal(d.root / "data" / "journal.sqlite3")
    try:
        counts = journal.counts()
    finally:
        journal.close()
    assert (counts.scored, counts.rejected, counts.queued) == (1, 5, 0)  # nothing lost, nothing left in flight


def test_a_decode_workers_stderr_goes_through_the_log_and_its_privacy_filter(make_daemon) -> None:
    """OpenCV's libjpeg writes "Corrupt JPEG data: premature end of data segment" to its process's fd 2 for a
    JPEG cut short; from a worker that line reaches the daemon's log with its text withheld, never raw."""
    d = make_daemon()
    d.start()
    whole = jpeg_bytes(9, size=256)
    drop(d.incoming, "cut.jpg", whole[: len(whole) // 2] + b"\xff\xd9")
    assert d.collect(1, timeout=60)[0].file_name == "cut.jpg"
    log = d.log()
    assert "Corrupt JPEG data" not in log
    eventually(  # the reader logs it in its own thread
        d.log,
        "the worker's stderr line logged, its text withheld",
        until=lambda log: "a line of decode_worker.stderr's (its text withheld" in log,
        timeout=90,
        every=0.1,
    )
    assert d.stop() == 0


def _nice(pid: int, tid: int | None = None) -> int:
    stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19 of proc(5), the nice value


def test_the_stages_that_feed_inference_run_below_it(make_daemon) -> None:
    """appliance/scheduling.py: the decode workers and the daemon's feeder threads (hashing, registering, storing,
    streaming) a few nice levels below inference, which keeps the process's priority."""
    d = _scored_one(make_daemon)
    assert d.proc is not None
    workers = decode_workers(d.proc.pid)
    assert workers and {_nice(w) for w in workers} == {FEEDER_NICE}
    threads = {int(tid): _nice(d.proc.pid, int(tid)) for tid in os.listdir(f"/proc/{d.proc.pid}/task")}
    assert threads[d.proc.pid] == 0  # the main thread, which loaded the model: ONNX Runtime's pool is its
    feeders = [tid for tid, nice in threads.items() if nice == FEEDER_NICE]
    # ingest, register, stabilizer, finisher, series, the result feed (the stream above follows it)
    assert len(feeders) >= 6, threads
    assert set(threads.values()) == {0, FEEDER_NICE}
    assert d.stop() == 0
