"""Admission: a slot per input in the stages, so a burst of thousands of files waits in the folder and the
journal, not in memory; and the counts that say when the stages are idle."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Admission:
    def __init__(self, slots: int, on_change: Callable[[int], None]) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._on_change = on_change  # the in-flight count, for the metrics
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._on_the_way = 0  # admitted inputs not yet at the batcher (or rejected before it)
        self._held = 0  # results waiting for disk space: they can't finish now

    def admit(self) -> None:
        """Take a slot (blocking while the stages are full); ``release`` gives it back."""
        self._slots.acquire()
        with self._lock:
            self._in_flight += 1
            self._on_the_way += 1
            self._on_change(self._in_flight)

    def arrived(self) -> None:
        """The input reached the batcher (or its rejection): it no longer counts as coming."""
        with self._lock:
            self._on_the_way -= 1

    def release(self) -> None:
        self._slots.release()
        with self._lock:
            self._in_flight -= 1
            self._on_change(self._in_flight)
            if self._in_flight == 0:
                self._idle.notify_all()

    def set_held(self, count: int) -> None:
        with self._lock:
            self._held = count
            self._idle.notify_all()

    def coming(self) -> bool:
        """Inputs admitted and still being read or prepared: the batcher may wait for them."""
        return self._on_the_way > 0

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def unfinished(self) -> int:
        """In flight, less those waiting for disk space."""
        with self._lock:
            return self._in_flight - self._held

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight but results waiting for disk space (those can't finish now)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight <= self._held, timeout)
