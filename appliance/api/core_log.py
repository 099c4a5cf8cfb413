"""grpc core's own lines, which it writes to the process's stderr (fd 2) outside Python's logging: a refused
TLS handshake is one of them, and grpcio has no hook for it. The daemon points fd 2 at a pipe read here, so
each refused handshake becomes a throttled log line that says why in words, other grpc core lines go through
the logging too (throttled), and anything else written to fd 2 reaches the real stderr unchanged."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import re
import sys
import threading
from typing import IO

from appliance.log_throttle import LogThrottle

log = logging.getLogger("appliance.api.tls")
core = logging.getLogger("grpc.core")

# absl's prefix: level letter, MMDD hh:mm:ss.micros, thread id, file:line]
_ABSL = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ([\w.+-]+:\d+)\] (.*)")
_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_HANDSHAKE = "Handshake failed with error "
# What BoringSSL says (measured with grpcio 1.85.1 for each kind of refused client), and what IT reads.
_REASONS = (
    ("unable to get local issuer certificate", "a client certificate the clinic's CA did not sign"),
    ("certificate has expired", "an expired client certificate"),
    ("certificate is not yet valid", "a client certificate not valid yet (or this box's clock is behind)"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no client certificate (each terminal needs its own)"),
    ("WRONG_VERSION_NUMBER", "not TLS (a plaintext client, or another protocol, on the TLS port)"),
)
_SAFE = re.compile(r"[^A-Za-z0-9 _:.()-]")


def handshake_reason(line: str) -> str | None:
    """Why a grpc core line says a TLS handshake failed, in words; None for any other line."""
    match = _ABSL.fullmatch(line)
    text = match.group(3) if match else ""
    if not text.startswith(_HANDSHAKE):
        return None
    for said, reason in _REASONS:
        if said in text:
            return reason
    # Another of BoringSSL's fixed reasons: kept, but only as the library's words (nothing a peer chose).
    detail = text.rsplit("OPENSSL_internal:", 1)[-1]
    return "TLS error " + _SAFE.sub("", detail)[:120]


class CoreLog:
    """The pipe behind fd 2 and the thread that reads it."""

    def __init__(self, original: int) -> None:
        self.original = original  # the real stderr, dup'ed
        read, write = os.pipe()
        self._read = read
        self.handshakes = LogThrottle(log)
        self.lines = LogThrottle(core)
        # Never blocking: a writer (a grpc core thread, perhaps holding its locks) loses a line rather than
        # waits on a reader that cannot run.
        os.set_blocking(write, False)
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._follow, name="grpc-core-log", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        with os.fdopen(self._read, "rb") as pipe:
            for raw in pipe:
                try:
                    self._line(raw)
                except Exception:  # a line this cannot place still reaches the real stderr
                    with contextlib.suppress(Exception):  # or is lost: the reader must outlive any one line
                        self._pass(raw)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        reason = handshake_reason(line)
        if reason is not None:
            self.handshakes.log(f"refused TLS handshakes: {reason}", "refused a TLS handshake: %s", reason)
            return
        match = _ABSL.fullmatch(line)
        if match is None:
            self._pass(raw)
            return
        level, where, text = match.groups()
        self.lines.log(f"grpc core lines from {where}", "grpc core (%s): %s", where, text, level=_LEVELS[level])

    def _pass(self, raw: bytes) -> None:
        view = memoryview(raw)
        while view:
            view = view[os.write(self.original, view) :]

    def close(self) -> None:
        """fd 2 back to the real stderr; what is still in the pipe is read for a moment (decode workers
        started meanwhile hold its other end, so its end is not waited for)."""
        os.dup2(self.original, 2)
        self._thread.join(timeout=1.0)
        self.handshakes.close()
        self.lines.close()


def capture_core_log() -> CoreLog:
    """Point fd 2 at a pipe read by a CoreLog; Python's own stderr (the log handlers, tracebacks, a crash's
    trace) keeps writing to the real one, so none of it waits on the reader or is lost with it."""
    sys.stderr.flush()
    original = os.dup(2)
    stream: IO[str] = open(original, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setStream(stream)
    sys.stderr = stream
    # A crash's trace is written by the dying process, whose reader thread may never run again.
    faulthandler.enable(stream)
    captured = CoreLog(original)
    atexit.register(captured.close)
    return captured
