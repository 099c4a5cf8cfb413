"""The daemon's stop: each part's stop step, in one set order, run on a thread of its own within a bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


class Shutdown:
    """Stop steps, each added once its part is built or started, run in ``order`` whatever order they were added
    in: a start that failed halfway stops what it had built, and only that. A step is named for the log."""

    def __init__(self, order: Sequence[str]) -> None:
        self._order = tuple(order)
        self._steps: dict[str, Callable[[], None]] = {}
        self._deadline = 0.0
        self._step = ""

    def add(self, step: str, stop: Callable[[], None]) -> None:
        if step not in self._order:
            raise ValueError(f"{step!r} is not a stop step")
        self._steps[step] = stop

    def left_s(self) -> float:
        """Seconds left before the bound of the stop under way."""
        return self._deadline - time.monotonic()

    def run(self, limit_s: float) -> str | None:
        """Run the steps in order; None once all are done, or the step still running after ``limit_s``: it is
        stuck, and left to the caller to abandon (it cannot be stopped)."""
        self._deadline = time.monotonic() + limit_s
        stopper = threading.Thread(target=self._run_steps, name="stop", daemon=True)
        stopper.start()
        stopper.join(limit_s)
        return self._step if stopper.is_alive() else None

    def _run_steps(self) -> None:
        for step in self._order:
            stop = self._steps.get(step)
            if stop is not None:
                self._step = step
                stop()
