"""Turns ready files into journaled inputs: skip what is known, hash, dedupe, hand new work to the processor."""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

from appliance.config import WatchConfig
from appliance.ingest import disposal
from appliance.ingest.content_hash import FileChanged, digest_file
from appliance.ingest.journal import InputRow, Journal
from appliance.privacy import log_failure
from appliance.results import InputFacts
from appliance.v1 import scoring_pb2 as pb

log = logging.getLogger(__name__)

HASH_WORKERS = 2


def display_name(path: Path) -> str:
    """The file name as text for results. Scanners on SMB shares may write Latin-1 names; bytes that are
    not UTF-8 become U+FFFD here, while the journal keeps the path's exact bytes."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Ingestor:
    """Registrations are serial (one thread), so the same file reported twice is journaled once; the
    content hashes before them run in a small pool, since hashing a 10 MB radiograph costs as much CPU as
    decoding it and the hash releases the GIL while it works."""

    def __init__(self, config: WatchConfig, journal: Journal, submit: Callable[[InputFacts, Path], None]) -> None:
        self.config = config
        self.journal = journal
        self._submit = submit
        self._queue: queue.Queue[Path | None] = queue.Queue()
        # Bounded: a burst waits here (as paths) rather than as a pile of finished hashes.
        self._hashed: queue.Queue[tuple[Path, os.stat_result, Future[str]] | None] = queue.Queue(2 * HASH_WORKERS)
        self._hashers = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="hash")
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
        self._hashers.shutdown(wait=False, cancel_futures=True)

    def alive(self) -> bool:
        return self._thread.is_alive() and self._registrar.is_alive()

    def offer(self, path: Path) -> None:
        """Called by the watcher for each completely written file."""
        self._queue.put(path)

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            if self._stopping.is_set():
                continue  # drain to the end marker quickly
            try:
                self._screen(path)
            except FileNotFoundError:
                pass  # moved away or deleted between the event and now: nothing to do
            except Exception as e:  # one odd file must never stop ingest
                log_failure(log, "ingest of a file failed; the next rescan retries it", error=e)
        self._hashed.put(None)

    def _screen(self, path: Path) -> None:
        """Cheap checks first; a file worth registering has its hash started in the pool."""
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            return  # only regular files are inputs; opening a FIFO would block ingest for good
        if self._known(path, st):
            return
        self._hashed.put((path, st, self._hashers.submit(digest_file, path, st)))

    def _known(self, path: Path, st: os.stat_result) -> bool:
        known = self.journal.find_file(str(path), st.st_size, st.st_mtime_ns)
        if known is None:
            return False
        if known.state != "queued":
            # Stored before a crash but not yet moved aside: finish the disposal, score nothing.
            self._dispose_again(known, path)
        return True

    def _register_loop(self) -> None:
        while (item := self._hashed.get()) is not None:
            path, st, hashing = item
            if self._stopping.is_set():
                hashing.cancel()
                continue
            try:
                self._register(path, st, hashing.result())
            except (FileNotFoundError, CancelledError):
                pass
            except FileChanged as e:  # a new event offers it again once it is stable
                log.debug("a file %s; it is taken again when stable", e)
            except Exception as e:  # one odd file must never stop ingest
                log_failure(log, "ingest of a file failed; the next rescan retries it", error=e)

    def _register(self, path: Path, st: os.stat_result, digest: str) -> None:
        # Checked again here, serially: the same file may have been offered twice while it was hashed.
        if self._known(path, st):
            return
        reg = self.journal.register(
            source="folder",
            path=str(path),
            file_name=display_name(path),
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            content_hash=digest,
        )
        original = reg.duplicate_of
        if original is not None and original.state == "queued" and original.path == str(path):
            # The queued input's own file, offered again (touched, say): its job owns the file.
            return
        if original is not None:
            log.info(
                "input %d is a duplicate of input %d (same content); not scored again",
                reg.input.id,
                original.id,
            )
            self._dispose_again(reg.input, path)
            return
        self._submit(
            InputFacts(input_id=reg.input.id, source="folder", file_name=display_name(path), content_hash=digest), path
        )

    def _dispose_again(self, row: InputRow, path: Path) -> None:
        original = self.journal.get_input(row.duplicate_of) if row.duplicate_of else row
        stored = self.journal.results_for_input(original.id) if original else []
        first = pb.Result.FromString(stored[0].payload) if stored else None
        if first is not None and first.outcome == pb.OUTCOME_REJECTED:
            where = disposal.dispose_rejected(path, row.id, first.rejection.code, first.rejection.message, self.config)
        else:
            where = disposal.dispose_scored(path, row.id, self.config)
        self.journal.set_disposed(row.id, where)
