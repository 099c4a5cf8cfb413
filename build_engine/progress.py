"""What `make engine` shows while it works: a bar for each long step (the images read, calibration, each gate, the
speed measured), counted, with its rate and the time left, on a terminal. Written to stderr and cleared when the
step ends, so the report's lines on stdout stay as they are; in a log, a pipe or CI nothing is shown at all."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
QUIET = "APPLIANCE_NO_PROGRESS"  # set (to anything) to show no bar on a terminal either


def shown() -> bool:
    return sys.stderr.isatty() and not os.environ.get(QUIET)


@contextmanager
def bar(what: str, total: int, unit: str = "image") -> Iterator[tqdm]:
    """A bar for ``total`` units of work; ``.update(n)`` as they are done."""
    with tqdm(
        total=total, desc=what, unit=unit, leave=False, disable=not shown(), file=sys.stderr, dynamic_ncols=True,
        mininterval=0.25,
    ) as progress:  # fmt: skip
        yield progress


def steps(items: Iterable[T], what: str, total: int, unit: str = "image") -> Iterator[T]:
    """``items``, counted on a bar as each is taken."""
    with bar(what, total, unit) as progress:
        for item in items:
            yield item
            progress.update(1)
