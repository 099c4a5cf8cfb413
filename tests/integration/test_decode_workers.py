"""Decode worker processes: one killed mid-burst costs no file, and none outlives a killed daemon."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

from appliance.v1 import scoring_pb2 as pb
from bench.daemon_run import process_tree

from .conftest import drop, png_bytes

BURST = 40


def _workers(daemon_pid: int) -> list[int]:
    """The decode workers: the forkserver's children (the daemon's own children are the forkserver and
    multiprocessing's resource tracker)."""
    return [p for p in process_tree(daemon_pid)[1:] if _parent(p) != daemon_pid]


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in helpers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in helpers), [p for p in helpers if _alive(p)]


def test_decode_workers_killed_while_idle_cost_nothing(make_daemon) -> None:
    """The OOM killer or an admin's kill between files: the next file finds the pool broken, renews it."""
    d = _scored_one(make_daemon)
    workers = _workers(d.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    # Reaped: the pool's manager, which waits on its workers, has seen them die (with nothing pending).
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # gone, not just a zombie
        assert time.monotonic() < deadline, "the killed workers were never reaped"
        time.sleep(0.05)
    names = [f"after-{n}.png" for n in range(5)]
    for n, name in enumerate(names):
        drop(d.incoming, name, png_bytes(20 + n, size=128))
    results = d.collect(6, timeout=60)
    assert sorted(r.file_name for r in results[1:]) == names
    assert all(r.outcome == pb.OUTCOME_SCORED for r in results)
    assert "a decode worker process died" in d.log()
