"""Throttled log lines for events a peer can repeat at will (refused calls, failed handshakes): the first of
each kind at once, then one line a period with how many more there were, so a flood cannot push real errors
past journald's rate limit."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

PERIOD_S = 60.0
# Kinds are a handful of fixed reasons, but some name a terminal or a certificate: past this many, the rest
# share one count, so a peer that varies what it sends cannot grow the table.
MAX_KINDS = 256
OTHER = "other refusals"


@dataclass
class _Kind:
    last: float  # when this kind last wrote a line
    held: int = 0  # events since then, not yet written
    timer: threading.Timer | None = None


class LogThrottle:
    """``log(kind, message, *args)`` writes at once for the first event of a kind, then holds the rest of the
    period and writes one summary line with their count when it ends (from a timer, so the count of a flood
    that has stopped is still told). Thread-safe; ``message`` is a %-format like the logging module's."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, period_s: float = PERIOD_S) -> None:
        self.logger = logger
        self.level = level
        self.period_s = period_s
        self._lock = threading.Lock()
        self._kinds: dict[str, _Kind] = {}
        self._closed = False

    def log(self, kind: str, message: str, *args: object, level: int | None = None) -> None:
        """``level`` overrides the throttle's own for this line (the summary lines keep the throttle's)."""
        now = time.monotonic()
        with self._lock:
            if kind not in self._kinds and len(self._kinds) >= MAX_KINDS:
                kind = OTHER
            state = self._kinds.get(kind)
            if state is None or (now - state.last >= self.period_s and state.held == 0):
                self._kinds[kind] = _Kind(last=now)
                write = True
            else:
                state.held += 1
                if state.timer is None and not self._closed:  # none started after close: nothing would stop it
                    state.timer = threading.Timer(max(0.0, state.last + self.period_s - now), self._flush, (kind,))
                    state.timer.daemon = True
                    state.timer.name = "log-throttle"
                    state.timer.start()
                write = False
        if write:
            self.logger.log(self.level if level is None else level, message, *args)

    def _flush(self, kind: str) -> None:
        with self._lock:
            state = self._kinds[kind]
            held, state.held, state.timer = state.held, 0, None
            state.last = time.monotonic()
        if held:
            self.logger.log(self.level, "%s: %d more in the last %g s", kind, held, self.period_s)

    def close(self) -> None:
        """Stop the pending timers (their counts are dropped); later events start none."""
        with self._lock:
            self._closed = True
            for state in self._kinds.values():
                if state.timer is not None:
                    state.timer.cancel()
                    state.timer = None
