"""Inference first: the work that feeds the model (the decode workers, the daemon's own threads: hashing,
registering, storing, streaming) runs a few nice levels below inference, so that where inference is the slow
stage (a large model on the CPU) it never waits for a core they hold.

ONNX Runtime's intra-op threads work in lock-step on each operator: one of them preempted by a decode or a
journal write stalls all the others until it runs again, so a few percent of the cores taken from inference
cost more than a few percent of its speed (measured on the default VGG16: 3-4% of end-to-end throughput). The
feeders still get every core inference leaves idle, and where decoding is the slow stage (small models, large
radiographs) inference takes little and nothing changes.

Linux keeps a nice value per thread: each feeder lowers its own as it starts. Inference runs on the batcher
thread and on the pool ONNX Runtime makes when a model is loaded; both keep the process's priority.
"""

from __future__ import annotations

import contextlib
import os
import threading

FEEDER_NICE = 5  # weight 335 against inference's 1024 (the kernel's table): about a quarter of a contended core


def lower_this_thread(by: int = FEEDER_NICE) -> None:
    """Lower the calling thread's priority by ``by`` nice levels (a process may always lower its own)."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or a sandbox that forbids it: no harm
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))


def thread_nice() -> int:
    """The calling thread's nice value (for the tests and the bench)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
