"""Turns ready files into journaled inputs: skip what is known, read ahead (hash and prepare), dedupe, journal."""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from appliance.domain.faults import Faults
from appliance.files.content_hash import FileChanged
from appliance.intake.intake import Arrival, Intake
from appliance.journal.journal import Journal
from appliance.privacy import log_failure

if TYPE_CHECKING:
    from appliance.prepare.pool import ReadAhead

log = logging.getLogger(__name__)


def display_name(path: Path) -> str:
    """The file name as text for results. Scanners on SMB shares may write Latin-1 names; bytes that are
    not UTF-8 become U+FFFD here, while the journal keeps the path's exact bytes."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class ReadAheadStage(Protocol):
    """What the folder's way in needs of the stages (appliance.scoring.stages.ScoringStages): a slot of the
    stages and a read-ahead in it, or the slot back."""

    def read_ahead(self, path: Path, screened: os.stat_result, file_name: str) -> Future[ReadAhead]: ...

    def drop(self) -> None: ...


class FolderIntake:
    """The watched folder's way in. Screens ready files, has each new one hashed and prepared in one read by
    the stages' workers (read-ahead), then submits them to the intake one at a time as their read-aheads
    finish, so the same file reported twice is journaled once and a slow file holds up no other.
    Only a journaled input goes on to inference and a result; a crash before that leaves the file in the
    folder for the next rescan.

    While ``faults`` says no input can be stored (a full disk), a file offered is left where it is and
    remembered (``held_back``); ``retake`` offers those again once it can."""

    def __init__(self, journal: Journal, stage: ReadAheadStage, intake: Intake, faults: Faults | None = None) -> None:
        self.journal = journal
        self._stage = stage
        self.intake = intake
        self.faults = faults or Faults()
        self._held_back: set[Path] = set()
        self._held_lock = threading.Lock()
        # Set by the daemon to the watcher's stability check: for a file that changed while it was read.
        self.reconsider: Callable[[Path], None] | None = None
        self._queue: queue.Queue[Path | None] = queue.Queue()
        # Finished read-aheads, unbounded: each holds one of the stages' slots, which bound them all.
        self._done: queue.Queue[tuple[Path, os.stat_result, float, Future[ReadAhead]] | None] = queue.Queue()
        self._outstanding = 0  # read-aheads started and not yet taken from _done
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._registrar = threading.Thread(target=self._register_loop, name="register", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._registrar.start()

    def stop(self) -> None:
        """Stop taking files: what is not registered yet is dropped (the files stay, the next start's
        rescan takes them); what is registered stays queued in the journal."""
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
        while (path := self._queue.get()) is not None:
            if self._stopping.is_set():
                continue  # drain to the end marker quickly
            try:
                self._screen(path)
            except FileNotFoundError:
                pass  # moved away or deleted between the event and now: nothing to do
            except Exception as e:  # one odd file must never stop ingest
                if self.faults.report(e):
                    self._hold_back(path)
                else:
                    log_failure(log, "ingest of a file failed; the next rescan retries it", error=e)
        self._done.put(None)

    def _screen(self, path: Path) -> None:
        """Cheap checks first; a file worth registering is read ahead (blocking while the stages are full)."""
        if not self.faults.accepting():
            self._hold_back(path)
            return
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            return  # only regular files are inputs; opening a FIFO would block ingest for good
        if self._known(path, st):
            return
        picked_up = time.perf_counter()
        reading = self._stage.read_ahead(path, st, display_name(path))
        with self._count_lock:
            self._outstanding += 1
        item = (path, st, picked_up, reading)
        reading.add_done_callback(lambda _: self._done.put(item))

    def _known(self, path: Path, st: os.stat_result) -> bool:
        known = self.journal.find_file(str(path), st.st_size, st.st_mtime_ns)
        if known is None:
            return False
        if known.state != "queued":
            # Stored before a crash but not yet moved aside: finish the disposal, score nothing.
            self.intake.dispose_again(known, path)
        return True

    def _register_loop(self) -> None:
        ended = False
        while True:
            with self._count_lock:
                if ended and self._outstanding == 0:
                    return
            item = self._done.get()
            if item is None:
                ended = True
                continue
            with self._count_lock:
                self._outstanding -= 1
            self._finish_read_ahead(*item)

    def _finish_read_ahead(self, path: Path, st: os.stat_result, picked_up: float, reading: Future[ReadAhead]) -> None:
        taken = False
        try:
            if not self._stopping.is_set() and not reading.cancelled():
                taken = self._register(path, st, reading.result(), picked_up)
        except FileNotFoundError:
            pass
        except FileChanged as e:  # rewritten, or its times set after closing (cp -p): taken again when stable
            log.debug("a file %s; it is taken again when stable", e)
            if self.reconsider is not None:
                self.reconsider(path)
        except Exception as e:  # one odd file must never stop ingest
            if self.faults.report(e):  # not journaled: the file waits in the folder for space
                self._hold_back(path)
            else:
                log_failure(log, "ingest of a file failed; the next rescan retries it", error=e)
        finally:
            if not taken:
                self._stage.drop()

    def _register(self, path: Path, st: os.stat_result, ahead: ReadAhead, picked_up: float) -> bool:
        """Journal the input; True when it went on to the stages."""
        if not self.faults.accepting():  # the disk filled while it was read: it waits in the folder
            self._hold_back(path)
            return False
        # Checked again here, serially: the same file may have been offered twice while it was read.
        if self._known(path, st):
            return False
        arrival = Arrival(
            source="folder",
            path=path,
            file_name=display_name(path),
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            content_hash=ahead.digest,
        )
        submitted = self.intake.submit(arrival, ahead=ahead, picked_up=picked_up)
        return submitted.duplicate_of is None and not submitted.already_queued
