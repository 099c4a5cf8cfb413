"""The folder watcher on a real folder: a file is reported only once completely written."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from appliance.config import WatchConfig
from appliance.intake.watcher import FolderWatcher
from tests.waiting import eventually


class _Seen:
    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.event = threading.Event()

    def __call__(self, path: Path) -> None:
        self.paths.append(path)
        self.event.set()

    def wait_for(self, path: Path, timeout: float = 5.0) -> bool:
        """True once ``path`` is reported; AssertionError past ``timeout``."""
        return eventually(lambda: path in self.paths, f"{path.name} reported", timeout=timeout, every=0.02)


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def watcher(request: pytest.FixtureRequest, tmp_path: Path):
    config = WatchConfig(dir=tmp_path / "in", polling=request.param, poll_interval_s=0.1, stable_s=0.3)
    config.dir.mkdir()
    seen = _Seen()
    w = FolderWatcher(config, seen, exclude=[tmp_path / "in" / "processed"])
    w.start()
    yield w, seen
    w.stop()


def _checked_at(w: FolderWatcher, path: Path, size: int, timeout: float = 5.0) -> bool:
    """True once the stability check has looked at ``path`` at ``size``: it had its chance to report it."""

    def looked_at() -> int | None:
        with w._lock:
            candidate = w._candidates.get(path)
        return None if candidate is None else candidate.size

    eventually(
        looked_at,
        f"{path.name} looked at at {size} bytes",
        until=lambda seen: seen == size,
        timeout=timeout,
        every=0.01,
    )
    return True


def test_a_file_still_being_written_is_not_reported(watcher) -> None:
    w, seen = watcher
    path = w.root / "slow.dcm"
    started = time.monotonic()
    with open(path, "wb") as f:
        # Growing for twice stable_s, however slow the machine, each size looked at before the next write.
        while time.monotonic() - started < 2 * w.config.stable_s:
            f.write(b"x" * 1000)
            f.flush()
            os.fsync(f.fileno())
            assert _checked_at(w, path, f.tell())
            assert path not in seen.paths
            time.sleep(0.1)  # the writer's pace, well inside stable_s
    assert seen.wait_for(path)


def test_a_file_renamed_in_from_outside_the_folder_is_ready_at_once(tmp_path: Path) -> None:
    """A sender that writes elsewhere on the same file system and renames in has finished: with inotify
    no stability wait applies (stable_s is long here, so a wait would show)."""
    config = WatchConfig(dir=tmp_path / "in", stable_s=30.0)
    config.dir.mkdir()
    seen = _Seen()
    w = FolderWatcher(config, seen, exclude=[])
    w.start()
    try:
        staged = tmp_path / "outside.dcm"
        staged.write_bytes(b"x" * 1000)
        os.replace(staged, config.dir / "outside.dcm")
        assert seen.wait_for(config.dir / "outside.dcm", timeout=5.0)
        os.replace(config.dir / "outside.dcm", tmp_path / "gone.dcm")  # moved out: nothing to report
        # Events are handled in the order they happened: once the marker is in, the move out was handled.
        (tmp_path / "marker.dcm").write_bytes(b"y")
        os.replace(tmp_path / "marker.dcm", config.dir / "marker.dcm")
        assert seen.wait_for(config.dir / "marker.dcm", timeout=5.0)
        assert seen.paths == [config.dir / "outside.dcm", config.dir / "marker.dcm"]
    finally:
        w.stop()


def test_ignored_names_and_excluded_folders(watcher) -> None:
    w, seen = watcher
    (w.root / ".hidden.dcm").write_bytes(b"x")
    (w.root / "upload.part").write_bytes(b"x")
    (w.root / "processed").mkdir()
    (w.root / "processed" / "done.dcm").write_bytes(b"x")
    (w.root / "sub").mkdir()
    real = w.root / "sub" / "real.dcm"
    real.write_bytes(b"x")
    assert seen.wait_for(real)
    # Written after the others were seen: a file taken wrongly is reported before the marker (inotify handles
    # events in order; polling finds them with `real`, a snapshot and a stability check before the marker's).
    marker = w.root / "marker.dcm"
    marker.write_bytes(b"y")
    assert seen.wait_for(marker)
    assert [p.name for p in seen.paths if p not in (real, marker)] == []


def test_rescan_finds_files_that_were_there_before(tmp_path: Path) -> None:
    config = WatchConfig(dir=tmp_path, stable_s=0.3)
    old = tmp_path / "old.png"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 60, time.time() - 60))
    seen = _Seen()
    w = FolderWatcher(config, seen, exclude=[])
    w.start()
    try:
        assert seen.wait_for(old, timeout=2)
    finally:
        w.stop()
