"""`--background`: the build the daemon runs while it serves (inference.build_on_start) takes only the CPU that
scoring leaves idle, and ends with the daemon."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def lowest_priority() -> None:
    """Called first in main, before any thread starts: Linux keeps a scheduling policy and a nice value per
    thread, and the threads made later (ONNX Runtime's, NumPy's) inherit them."""
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # runs only on a core nothing else wants
    with contextlib.suppress(OSError):
        os.nice(19)  # where SCHED_IDLE is refused
    # The daemon gone (kill -9, OOM): SIGINT, so the build removes its work folder as it ends.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
