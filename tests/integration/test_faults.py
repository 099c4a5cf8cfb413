"""Faults the daemon must show and survive: a full data disk, a watch folder deleted and recreated. Health goes
NOT_SERVING with the problem in GetStatus and one sentence in the log, and the daemon resumes on its own."""

from __future__ import annotations

import errno
import os
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.waiting import eventually

from .conftest import Daemon, drop, free_port, png_bytes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(d: Daemon) -> int:
    with d.channel() as ch:
        request = health_pb2.HealthCheckRequest(service="appliance.v1.Scoring")
        return int(health_pb2_grpc.HealthStub(ch).Check(request, timeout=5).status)


def wait_for(what: str, check: Callable[[], bool], d: Daemon, timeout: float = 60.0) -> None:
    """Poll ``check`` until it holds; fail with the daemon's log at the timeout (a bound, not a timing)."""

    def holds() -> bool:
        assert d.proc is not None and d.proc.poll() is None, f"daemon exited:\n{d.log()[-4000:]}"
        return check()

    eventually(holds, what, timeout=timeout, context=lambda: d.log()[-4000:])


def metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def waiting_files(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if not p.startswith(".")) if folder.is_dir() else []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 32 MB file system (tmpfs) for the data, processed and rejected folders."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write until the file system says ENOSPC."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096):  # then the last partial MB too: not one page left
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC, e


@pytest.mark.parametrize(
    ("min_free_mb", "burst"),
    [(8, 0), (0, 0), (0, 20)],
    # 0 MB: only a write that fails can notice the full disk; with a burst in flight, results and moves fail too.
    ids=["low_water_mark", "failed_write", "failed_writes_mid_burst"],
)
def test_full_data_disk_pauses_intake_and_resumes_when_space_returns(
    make_daemon: type[Daemon], small_disk: Path, min_free_mb: int, burst: int
) -> None:
    metrics_port = free_port()
    d = make_daemon(
        storage={"data_dir": small_disk / "data", "min_free_mb": min_free_mb},
        watch={"processed_dir": small_disk / "processed", "rejected_dir": small_disk / "rejected"},
        server={"metrics_port": metrics_port},
    )
    d.start()
    drop(d.incoming, "before.png", png_bytes(1))
    assert [r.file_name for r in d.collect(1)] == ["before.png"]

    names = [f"burst-{n:02d}.png" for n in range(burst)]
    for n, name in enumerate(names):
        drop(d.incoming, name, png_bytes(200 + n, size=256))
    filler = small_disk / "filler.bin"
    fill(filler)
    during = [f"during-{n}.png" for n in range(5)]
    names += during
    if min_free_mb:
        wait_for("health NOT_SERVING", lambda: health(d) == NOT_SERVING, d)
        for n, name in enumerate(during):
            drop(d.incoming, name, png_bytes(100 + n))
        # Each file offered is left in the folder, unscored, until space returns.
        wait_for("5 files held back", lambda: metric(metrics_port, "appliance_files_held_back") == 5, d)
        assert waiting_files(d.incoming) == during
        status = d.status()
        assert (status.last_sequence, status.queue_depth) == (1, 0)
    else:
        for n, name in enumerate(during):  # a write for one of them, at least, finds the disk full
            drop(d.incoming, name, png_bytes(100 + n))
        wait_for("health NOT_SERVING", lambda: health(d) == NOT_SERVING, d)

    problems = list(d.status().problems)
    assert len(problems) == 1 and problems[0].startswith("Storage fault:"), problems
    with d.channel() as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.ScoringStub(ch).Score(pb.ScoreRequest(image=png_bytes(7), file_name="sent.png"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "Storage fault:" in (refused.value.details() or "")

    filler.unlink()
    d.wait_ready(timeout=60)  # SERVING again by itself
    assert list(d.status().problems) == []
    results = d.collect(1 + len(names))
    counts = Counter(r.file_name for r in results)
    assert set(counts) == {"before.png", *names}, counts
    assert max(counts.values()) == 1, counts
    assert all(r.outcome == pb.OUTCOME_SCORED for r in results), [r.rejection.message for r in results]
    wait_for("the watch folder emptied", lambda: not waiting_files(d.incoming), d)
    status = d.status()
    total = 1 + len(names)
    assert (status.last_sequence, status.queue_depth, status.scored) == (total, 0, total)

    assert d.stop() == 0
    text = d.log()
    assert text.count("Storage fault:") == 1, text
    assert text.count("Space is free again") == 1, text
    assert "Traceback" not in text
    assert "OperationalError" not in text


@pytest.mark.parametrize(
    ("how", "polling"),
    [("renamed", False), ("deleted", False), ("deleted", True)],
    ids=["renamed", "deleted", "polled"],
)
def test_watch_folder_gone_and_back_is_rearmed(make_daemon: type[Daemon], how: str, polling: bool) -> None:
    # rescan_interval_s: only the re-armed watch can take the new file, not the safety-net rescan.
    d = make_daemon(watch={"rescan_interval_s": 3600, "polling": polling, "poll_interval_s": 0.2})
    d.start()
    drop(d.incoming, "first.png", png_bytes(1))
    d.collect(1)
    wait_for("first.png moved aside", lambda: not waiting_files(d.incoming), d)

    if how == "renamed":
        d.incoming.rename(d.root / "incoming.old")
    else:
        for leftover in d.incoming.iterdir():  # the senders' dotfiles
            leftover.unlink()
        d.incoming.rmdir()
    wait_for("health NOT_SERVING", lambda: health(d) == NOT_SERVING, d)
    problems = list(d.status().problems)
    assert len(problems) == 1 and "watch folder" in problems[0] and "missing" in problems[0], problems

    d.incoming.mkdir()
    d.wait_ready(timeout=60)
    drop(d.incoming, "second.png", png_bytes(2))
    results = d.collect(2, timeout=60)
    assert [r.file_name for r in results] == ["first.png", "second.png"]
    assert list(d.status().problems) == []
    assert d.stop() == 0
    text = d.log()
    assert text.count("is missing (deleted, renamed or unmounted)") == 1, text
    assert text.count("is back; watching it again") == 1, text
    assert "Traceback" not in text
