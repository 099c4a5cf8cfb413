"""Decode workers' own stderr read into the log, throttled, instead of going straight to the daemon's stderr.

What a worker writes to its fd 2 never passes through Python's logging: a native decoder's warnings, Rust's
"memory allocation of N bytes failed" before it aborts, a traceback printed as a worker dies. Such text may quote
a file name or a header value, so each line is logged under a library's logger name, whose text the handler's
privacy filter (privacy.WithholdLibraryText) withholds; a Rust allocation failure, which quotes nothing, is
named in a line of our own. At most LINES_PER_WINDOW lines a window, then one line with the count held back.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext

LINES_PER_WINDOW = 20
WINDOW_S = 60.0
_LINE_MAX = 4096  # a line longer than this is cut: the pipe's reader never holds more than this of one
_ALLOCATION_FAILED = re.compile(rb"memory allocation of \d+ bytes failed")
raw = logging.getLogger("decode_worker.stderr")  # not ours: its text is withheld by the privacy filter
log = logging.getLogger(__name__)


class WorkerStderr:
    """A pipe each worker process makes its fd 2, and the thread that logs what comes out of it."""

    def __init__(self, context: BaseContext) -> None:
        self._reader, self.writer = context.Pipe(duplex=False)
        self._window_start = time.monotonic()
        self._logged = 0
        self._held = 0
        self._thread = threading.Thread(target=self._pump, name="worker-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._reader.fileno(), 65536)
            except (OSError, ValueError):  # closed
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _LINE_MAX:
                lines.append(pending)
                pending = b""
            for line in lines:
                if line.strip():
                    self._emit(line[:_LINE_MAX])

    def _emit(self, line: bytes) -> None:
        now = time.monotonic()
        if now - self._window_start >= WINDOW_S:
            if self._held:
                log.warning("%d more lines from the decode workers' stderr were held back", self._held)
            self._window_start, self._logged, self._held = now, 0, 0
        if self._logged >= LINES_PER_WINDOW:
            self._held += 1
            return
        self._logged += 1
        if _ALLOCATION_FAILED.search(line):
            log.warning("a decode worker's native code could not allocate memory (past limits.worker_memory_mb)")
        else:
            raw.warning("%s", line.decode("utf-8", "replace"))

    def close(self) -> None:
        """Stop reading once every worker's end is closed too (they are gone by now): the reader sees the end."""
        self.writer.close()
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():  # never closed under a read in progress: its fd could be reused
            self._reader.close()


def redirect_stderr(writer: Connection) -> None:
    """In a worker process: its fd 2 (and so sys.stderr, and native code's writes) goes to the daemon's reader."""
    os.dup2(writer.fileno(), 2)
    writer.close()
