"""Turns ready files into journaled inputs: skip what is known, hash, then the one submit (dedupe, journal, score)."""

from __future__ import annotations

import logging
import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from appliance.domain.faults import Faults
from appliance.files.content_hash import FileChanged, digest_file
from appliance.intake.intake import Arrival, Intake
from appliance.journal.journal import Journal
from appliance.privacy import log_failure
from appliance.scheduling import lower_this_thread

log = logging.getLogger(__name__)

HASHED_AHEAD = 4  # files hashed ahead of the one being journaled


def display_name(path: Path) -> str:
    """The file name as text for results. Scanners on SMB shares may write Latin-1 names; bytes that are
    not UTF-8 become U+FFFD here, while the journal keeps the path's exact bytes."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class FolderIntake:
    """The watched folder's way in. Screens ready files one at a time, hashes each new one and submits it to
    the intake (blocking while the stages are full); the same file reported twice is journaled once. A crash
    before it is journaled leaves the file in the folder for the next rescan.

    While ``faults`` says no input can be stored (a full disk), a file offered is left where it is and
    remembered (``held_back``); ``retake`` offers those again once it can."""

    def __init__(self, journal: Journal, intake: Intake, faults: Faults | None = None) -> None:
        self.journal = journal
        self.intake = intake
        self.faults = faults or Faults()
        self._held_back: set[Path] = set()
        self._held_lock = threading.Lock()
        # Set by the daemon to the watcher's stability check: for a file that changed while it was hashed.
        self.reconsider: Callable[[Path], None] | None = None
        self._queue: queue.Queue[Path | None] = queue.Queue()
        # Hashed and not yet journaled: the next file is hashed while this one is journaled and admitted.
        self._hashed: queue.Queue[Arrival | None] = queue.Queue(maxsize=HASHED_AHEAD)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._registrar = threading.Thread(target=self._register_loop, name="register", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._registrar.start()

    def stop(self) -> None:
        """Stop taking files: what is not journaled yet is left (the files stay, the next start's rescan
        takes them); what is journaled stays queued in the journal."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._registrar.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive() and self._registrar.is_alive()

    def offer(self, path: Path) -> None:
        """Called by the watcher for each completely written file."""
        self._queue.put(path)

    def held_back(self) -> int:
        """Files left in the folder while a fault stopped intake, to be taken when it is over."""
        with self._held_lock:
            return len(self._held_back)

    def retake(self) -> None:
        """Intake may go on: offer again what was left in the folder meanwhile."""
        with self._held_lock:
            paths, self._held_back = sorted(self._held_back), set()
        for path in paths:
            self._queue.put(path)

    def _hold_back(self, path: Path) -> None:
        with self._held_lock:
            self._held_back.add(path)

    def _run(self) -> None:
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        while (path := self._queue.get()) is not None:
            if not self._stopping.is_set():  # else drain to the end marker quickly
                self._guarded(path, self._hash)
        self._hashed.put(None)

    def _register_loop(self) -> None:
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        while (arrival := self._hashed.get()) is not None:
            if not self._stopping.is_set():
                self._guarded(arrival.path, lambda _: self._register(arrival))

    def _guarded(self, path: Path, step: Callable[[Path], None]) -> None:
        try:
            step(path)
        except FileNotFoundError:
            pass  # moved away or deleted between the event and now: nothing to do
        except FileChanged as e:  # rewritten, or its times set after closing (cp -p): taken again when stable
            log.debug("a file %s; it is taken again when stable", e)
            if self.reconsider is not None:
                self.reconsider(path)
        except Exception as e:  # one odd file must never stop ingest
            if self.faults.report(e):  # not journaled: the file waits in the folder for space
                self._hold_back(path)
            else:
                # Not journaled: the next rescan takes it; journaled: it stays queued for the next start.
                log_failure(log, "ingest of a file failed; a rescan or the next start takes it again", error=e)

    def _hash(self, path: Path) -> None:
        """Cheap checks first; a new file is hashed, as the very file screened, for the registrar."""
        if not self.faults.accepting():
            self._hold_back(path)
            return
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            return  # only regular files are inputs; opening a FIFO would block ingest for good
        if self._known(path, st.st_size, st.st_mtime_ns):
            return
        picked_up = time.perf_counter()
        self._hashed.put(
            Arrival(
                source="folder",
                path=path,
                file_name=display_name(path),
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                content_hash=digest_file(path, st),
                inode=st.st_ino,
                picked_up=picked_up,
            )
        )

    def _register(self, arrival: Arrival) -> None:
        """The one submit (blocking while the stages are full), unless the disk filled or the same file was
        journaled meanwhile (offered twice while it was hashed)."""
        if not self.faults.accepting():
            self._hold_back(arrival.path)
            return
        if self._known(arrival.path, arrival.size, arrival.mtime_ns):
            return
        self.intake.submit(arrival)

    def _known(self, path: Path, size: int, mtime_ns: int) -> bool:
        known = self.journal.find_file(str(path), size, mtime_ns)
        if known is None:
            return False
        if known.state != "queued":
            # Stored before a crash but not yet moved aside: finish the disposal, score nothing.
            self.intake.dispose_again(known, path)
        return True
