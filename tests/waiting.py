"""Waiting in a test for what another thread or process does: one poll loop, its deadline a bound on a broken test.

A test that waits asserts what it waits for, never how long it took: the timeout only turns a hang into a failure
that says what was awaited and what was last seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_SHOWN = 600  # characters of the last value a failure shows (its end, where a log's news is)


def eventually(
    probe: Callable[[], T],
    what: str,
    *,
    until: Callable[[T], object] = bool,
    timeout: float = 60.0,
    every: float = 0.05,
    wait: Callable[[], object] | None = None,
    ignoring: tuple[type[Exception], ...] = (),
    context: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until ``until`` holds for what it returned (by default: the value is truthy); that value.

    Parameters
    ----------
    probe
        Reads the state awaited: a predicate, or a function whose value the caller then checks further.
    what
        What is awaited, in words, for the failure message.
    until
        Holds for the value awaited.
    timeout
        Seconds before the wait fails with an AssertionError naming ``what`` and the last value seen.
    every
        Seconds slept between probes.
    wait
        Called between probes instead of sleeping, where something signals a change (a journal's commits).
    ignoring
        Exceptions from ``probe`` that mean "not yet" (a server not listening yet); any other propagates.
    context
        Appended to the failure message (a daemon's log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        seen: object
        try:
            seen = value = probe()
        except ignoring as e:
            seen = e
        else:
            if until(value):
                return value
        if time.monotonic() >= deadline:
            shown = repr(seen)
            if len(shown) > _SHOWN:
                shown = "..." + shown[-_SHOWN:]
            message = f"not so within {timeout:g} s: {what}; last seen: {shown}"
            raise AssertionError(message + ("\n" + context() if context is not None else ""))
        if wait is not None:
            wait()
        else:
            time.sleep(every)
