"""Watches the export folder and reports each file once it is completely written."""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

try:  # Linux: full events tell a file renamed in from outside the folder from one being written
    from watchdog.observers.inotify import InotifyObserver
except ImportError:  # pragma: no cover - other platforms
    InotifyObserver = None  # type: ignore[assignment,misc]

from appliance.config import WatchConfig
from appliance.domain.faults import WATCH_DIR, Faults
from appliance.privacy import log_failure
from appliance.scheduling import lower_this_thread

log = logging.getLogger(__name__)

TICK_S = 0.05
# What inotify reports to us: creation, close after writing, renames. Not every write of a file being
# written, nor our own workers opening and reading each input (4 more events a file, each through
# watchdog's threads). The polling observer, which only compares listings, gets no filter.
INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


class _StopRaceFilter(logging.Filter):
    """watchdog 7 logs an ERROR when its inotify thread is stopped in the middle of a read. That only
    happens when we stop the observer, and it is harmless; IT staff should not see an error for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRaceFilter())


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float  # monotonic time the (size, mtime) pair was first seen


class FolderWatcher:
    """A close-write event, or a rename into the folder, makes a file ready at once; otherwise (polling
    observers, network shares, files found by a rescan) it is ready when size and mtime hold still for ``stable_s``.

    The same path may be reported more than once (event and rescan); the journal makes that harmless.

    The folder itself is checked every tick: deleted, renamed away or unmounted, it is a fault in ``faults``
    (health NOT_SERVING); when a folder is there again under that path (a new one, or a mount), the watch is
    set up on it anew (an inotify watch follows the old folder's inode, not the path) and it is rescanned.
    """

    def __init__(
        self,
        config: WatchConfig,
        on_ready: Callable[[Path], None],
        exclude: list[Path],
        faults: Faults | None = None,
    ) -> None:
        self.config = config
        self.root = config.dir
        self._on_ready = on_ready
        self._exclude = [p.resolve() for p in exclude]
        self.faults = faults or Faults()
        self._candidates: dict[Path, _Candidate] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: BaseObserver = (
            PollingObserver(timeout=config.poll_interval_s)
            if config.polling
            else InotifyObserver(generate_full_events=True)
            if InotifyObserver is not None
            else Observer()
        )
        self._thread = threading.Thread(target=self._run, name="stabilizer", daemon=True)
        self._last_rescan = 0.0
        self._armed: tuple[int, int] | None = None  # (st_dev, st_ino) of the folder being watched
        self._rescan_asked = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._arm()
        self._observer.start()
        self._thread.start()
        # Files dropped while the daemon was down (or while the observer was starting).
        self.rescan()

    def _arm(self) -> None:
        """Watch the folder now at ``root``, dropping any watch on an earlier one."""
        st = os.stat(self.root)
        self._observer.unschedule_all()
        self._observer.schedule(
            _Handler(self),
            str(self.root),
            recursive=self.config.recursive,
            event_filter=None if self.config.polling else INOTIFY_EVENTS,
        )
        self._armed = (st.st_dev, st.st_ino)

    def request_rescan(self) -> None:
        """Rescan at the next tick (e.g. once a fault that kept files in the folder is over)."""
        self._rescan_asked.set()

    def stop(self) -> None:
        self._stop.set()
        self._observer.stop()
        self._observer.join(timeout=5)
        self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread.is_alive() and self._observer.is_alive()

    # --- what counts as an input ------------------------------------------------------------------

    def ignored(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return True
        if any(part.startswith(".") for part in rel.parts):
            return True  # dotfiles and hidden folders: scanners' and editors' temporary files
        if any(fnmatch.fnmatch(path.name, pat) for pat in self.config.ignore_patterns):
            return True
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop or a dangling link: not an input
            return True
        return any(resolved.is_relative_to(ex) for ex in self._exclude)

    def rescan(self) -> int:
        """Queue every file under the folder for a stability check; returns how many were found."""
        found = 0
        walker = os.walk(self.root) if self.config.recursive else [(str(self.root), [], os.listdir(self.root))]
        for dirpath, _dirs, files in walker:
            for name in sorted(files):
                path = Path(dirpath) / name
                if not self.ignored(path):
                    self.consider(path)
                    found += 1
        self._last_rescan = time.monotonic()
        return found

    def consider(self, path: Path) -> None:
        """A file was created or changed: watch it until it is stable."""
        if self.ignored(path):
            return
        with self._lock:
            self._candidates.setdefault(path, _Candidate(-1, -1, time.monotonic()))

    def closed(self, path: Path) -> None:
        """A writer closed the file: it is complete."""
        if self.ignored(path):
            return
        with self._lock:
            self._candidates.pop(path, None)
        try:
            regular = stat.S_ISREG(path.lstat().st_mode)
        except OSError:
            return
        if regular:
            self._on_ready(path)

    # --- stability loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        while not self._stop.wait(TICK_S):
            try:
                if not self._check_folder():
                    continue
                self._tick()
                every = self.config.rescan_interval_s
                if self._rescan_asked.is_set() or (every and time.monotonic() - self._last_rescan >= every):
                    self._rescan_asked.clear()
                    self.rescan()
            except Exception as e:  # the watcher must survive anything the filesystem does
                log_failure(log, "watcher tick failed", error=e)

    def _check_folder(self) -> bool:
        """True while the watched folder is there; re-arms the watch on a folder that came (back) under
        its path."""
        try:
            st = os.stat(self.root)
            there = stat.S_ISDIR(st.st_mode)
        except OSError:
            there = False
        if not there:
            self.faults.set(
                WATCH_DIR,
                f"The watch folder {self.root} is missing (deleted, renamed or unmounted); no new files are "
                "taken until it is back.",
            )
            return False
        # An inode number is reused at once by a folder deleted and made again: a watch whose emitter
        # ended (inotify's delete-self, the poller losing the folder) or a fault seen says so instead.
        if (st.st_dev, st.st_ino) != self._armed or self.faults.holds(WATCH_DIR) or not self._watching():
            self._arm()
            if not self.faults.holds(WATCH_DIR):  # replaced between two ticks, or mounted over
                log.warning("the watch folder %s was replaced; watching the new one", self.root)
            self.faults.clear(WATCH_DIR, f"The watch folder {self.root} is back; watching it again.")
            self.rescan()
        return True

    def _watching(self) -> bool:
        emitters = list(self._observer.emitters)
        return bool(emitters) and all(e.is_alive() for e in emitters)

    def _tick(self) -> None:
        now = time.monotonic()
        ready: list[Path] = []
        with self._lock:
            for path, cand in list(self._candidates.items()):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    del self._candidates[path]
                    continue
                if not stat.S_ISREG(st.st_mode):  # FIFOs, sockets, devices, symlinks: reading could block forever
                    del self._candidates[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                    self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now)
                    continue
                # Only our own clock counts: a network share's mtime may come from a clock that is behind.
                if now - cand.since >= self.config.stable_s:
                    del self._candidates[path]
                    ready.append(path)
        for path in ready:
            self._on_ready(path)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.w = watcher

    @staticmethod
    def _path(raw: bytes | str) -> Path:
        return Path(os.fsdecode(raw))

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.w.consider(self._path(event.src_path))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.w.consider(self._path(event.src_path))

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.w.closed(self._path(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        # 'write x.part, rename to x.dcm' is how careful senders publish a finished file, also when x.part
        # was written outside the folder (then src_path is empty). An empty dest_path: moved out.
        if event.is_directory:
            self.w.rescan()
        elif event.dest_path:
            self.w.closed(self._path(event.dest_path))
