"""Runs fuzz inputs through `Preparer.prepare` in worker processes with a memory and a time limit.

Each worker is a fresh interpreter (spawn) holding one Preparer for the pipeline-test model and the default
limits. It answers one case at a time; a worker that crashes, runs over the time limit or runs out of memory
is replaced, so one case never spoils the next.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import multiprocessing
import os
import resource
import signal
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "pipeline-test"
MEMORY_MB = 2048
TIMEOUT_S = 10.0
# What counts as a bug; "clean" and "rejected" are the two good outcomes.
FINDINGS = ("crash", "hang", "memory", "uncaught", "bad_output")
# The preprocessed tensor holds (display value - mean) / std with display values in 0..1; the pipeline-test
# manifest has mean 0.5 and std 0.25, so every value lies in -2..2.
TENSOR_RANGE = (-2.0 - 1e-3, 2.0 + 1e-3)


@dataclass(frozen=True)
class Outcome:
    """What one input did. kind: clean, rejected, or one of FINDINGS; code: the rejection code, the
    exception's type or the signal's name; detail: the message, traceback or fatal-error dump."""

    kind: str
    code: str = ""
    detail: str = ""
    seconds: float = 0.0

    @property
    def finding(self) -> bool:
        return self.kind in FINDINGS

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.code}" if self.code else self.kind


# --- the worker process ------------------------------------------------------------------------


def _serve(conn: Connection, memory_mb: int, crash_log: str) -> None:
    """Worker main loop: (name, bytes) in, (kind, code, detail, seconds) out."""
    # No core dumps of crashed decoders; memory capped as the brief of the fuzzer asks (address space).
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    limit = memory_mb << 20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the campaign, which stops its workers
    # Native decoders print to stderr; a campaign of 100,000 cases would drown its summary. A fatal
    # signal's Python stack goes to the crash log the parent reads.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    log = open(crash_log, "w")  # noqa: SIM115 - open for the life of the process, for faulthandler
    faulthandler.enable(file=log)

    import logging
    import warnings

    from appliance.config import LimitsConfig
    from appliance.domain.errors import InputRejected
    from appliance.domain.manifest import load_manifest
    from appliance.prepare.preparer import Preparer

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    try:
        from appliance.logging_setup import quiet_pydicom

        quiet_pydicom()  # as the daemon's workers do
    except ImportError:
        pass
    preparer = Preparer(load_manifest(MODEL, require_onnx=False).manifest, LimitsConfig())
    conn.send(("ready", "", "", 0.0))
    while True:
        try:
            name, data = conn.recv()
        except EOFError:
            return
        t0 = time.perf_counter()
        try:
            prepared = preparer.prepare(data, name)
            kind, code, detail = _check(prepared.tensors)
        except InputRejected as e:
            kind, code, detail = "rejected", e.code, e.message
        except MemoryError:
            kind, code, detail = "memory", "MemoryError", _trace()
        except BaseException as e:  # everything else is a finding, PanicException and SystemExit included
            kind, code, detail = "uncaught", type(e).__name__, _trace()
        conn.send((kind, code, detail, time.perf_counter() - t0))


def _trace() -> str:
    return "".join(traceback.format_exc(limit=-12))[-6000:]


def _check(tensors: tuple[np.ndarray, ...]) -> tuple[str, str, str]:
    """A clean result must be usable: at least one tensor, the model's shape and dtype, finite, in range."""
    if not tensors:
        return "bad_output", "no_tensors", "prepare() returned no tensors"
    for i, t in enumerate(tensors):
        if t.shape != (1, 64, 64) or t.dtype != np.float32:
            return "bad_output", "shape", f"tensor {i}: {t.shape} {t.dtype}, expected (1, 64, 64) float32"
        if not np.isfinite(t).all():
            return "bad_output", "not_finite", f"tensor {i} holds {int((~np.isfinite(t)).sum())} NaN or inf values"
        lo, hi = float(t.min()), float(t.max())
        if lo < TENSOR_RANGE[0] or hi > TENSOR_RANGE[1]:
            return "bad_output", "range", f"tensor {i} spans {lo}..{hi}, outside {TENSOR_RANGE}"
    return "clean", "", f"{len(tensors)} tensor(s)"


# --- the parent side ---------------------------------------------------------------------------


_numbers = itertools.count()


class _Worker:
    def __init__(self, memory_mb: int, folder: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.crash_log = str(Path(folder) / f"worker-{next(_numbers)}.log")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, memory_mb, self.crash_log), daemon=True)
        self.process.start()
        child.close()
        self.key: Any = None
        self.started = 0.0
        self.ready = False

    def send(self, key: Any, name: str, data: bytes) -> None:
        self.key, self.started = key, time.monotonic()
        self.conn.send((name, data))

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def death(self) -> Outcome:
        """Why the worker died during its case."""
        self.process.join(5)
        code = self.process.exitcode
        dump = ""
        with contextlib.suppress(OSError):
            dump = Path(self.crash_log).read_text(errors="replace")[-6000:]
        seconds = time.monotonic() - self.started
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            # SIGKILL that we did not send: the kernel's OOM killer, the address-space cap having missed it
            return Outcome("memory" if -code == signal.SIGKILL else "crash", name, dump, seconds)
        return Outcome("crash", f"exit {code}", dump, seconds)


class Pool:
    """`workers` worker processes; `run` feeds them cases and yields (key, Outcome) as they finish."""

    def __init__(self, workers: int = 1, *, memory_mb: int = MEMORY_MB, timeout_s: float = TIMEOUT_S) -> None:
        self.size, self.memory_mb, self.timeout_s = workers, memory_mb, timeout_s
        self._folder = tempfile.TemporaryDirectory(prefix="fuzz-workers-")
        self.workers: list[_Worker] = []
        self.restarts = 0

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers.clear()
        self._folder.cleanup()

    def _spawn(self) -> _Worker:
        return self._await(_Worker(self.memory_mb, self._folder.name))

    @staticmethod
    def _await(worker: _Worker) -> _Worker:
        """Wait for a started worker's 'ready' (it imports OpenCV, pydicom and the appliance first)."""
        if not worker.conn.poll(120):
            worker.kill()
            raise RuntimeError("a fuzz worker did not start within 120 s")
        try:
            worker.conn.recv()
        except EOFError as e:
            raise RuntimeError(f"a fuzz worker died while starting (exit {worker.process.exitcode})") from e
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        """A fresh worker in the place of one that died, ran over time or ran out of memory."""
        worker.kill()
        with contextlib.suppress(OSError):
            os.unlink(worker.crash_log)
        fresh = self._spawn()
        self.workers[self.workers.index(worker)] = fresh
        self.restarts += 1
        return fresh

    def run(self, cases: Iterable[tuple[Any, str, bytes]]) -> Iterator[tuple[Any, Outcome]]:
        """cases: (key, file name, bytes). Outcomes come back as cases finish, not in order."""
        if len(self.workers) < self.size:  # start them together, then wait for each
            started = [_Worker(self.memory_mb, self._folder.name) for _ in range(self.size - len(self.workers))]
            self.workers += [self._await(worker) for worker in started]
        pending = iter(cases)
        idle: deque[_Worker] = deque(self.workers)
        busy: dict[Any, _Worker] = {}
        exhausted = False
        while True:
            while idle and not exhausted:
                case = next(pending, None)
                if case is None:
                    exhausted = True
                    break
                worker = idle.popleft()
                worker.send(*case)
                busy[worker.conn] = worker
            if not busy:
                return
            deadline = min(w.started for w in busy.values()) + self.timeout_s
            for conn in wait(list(busy), timeout=max(0.0, deadline - time.monotonic())):
                worker = busy.pop(conn)
                key = worker.key
                try:
                    kind, code, detail, seconds = worker.conn.recv()
                except (EOFError, OSError):
                    outcome = worker.death()
                    idle.append(self._replace(worker))
                    yield key, outcome
                    continue
                outcome = Outcome(kind, code, detail, seconds)
                # after a MemoryError the worker's heap may be in any state: start afresh
                idle.append(self._replace(worker) if outcome.kind == "memory" else worker)
                yield key, outcome
            now = time.monotonic()
            for conn, worker in list(busy.items()):
                if now - worker.started >= self.timeout_s:
                    del busy[conn]
                    key, seconds = worker.key, now - worker.started
                    idle.append(self._replace(worker))
                    yield key, Outcome("hang", f"over {self.timeout_s:g} s", "", seconds)

    def run_one(self, name: str, data: bytes) -> Outcome:
        """One input, alone."""
        return next(iter(self.run([(None, name, data)])))[1]
