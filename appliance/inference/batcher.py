"""Dynamic batching: gather samples up to the backend's max batch or a short delay, run them together."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from appliance.inference.backend import Backend

log = logging.getLogger(__name__)

# The model that runs a batch, as the batcher's user names it (the scoring stages: appliance.scoring.job.Scorer);
# each batch's timing carries the one that ran it, since a swap may put another in place meanwhile.
M = TypeVar("M")


@dataclass(frozen=True)
class Row:
    """One sample's share of a batch's outputs: activated scores, and its heatmap where the backend gives one."""

    scores: np.ndarray
    heatmap: np.ndarray | None = None


@dataclass(frozen=True)
class BatchTiming(Generic[M]):
    queue_ms: float  # from submit to the batch starting
    infer_ms: float  # the whole batch's inference
    batch_size: int
    scored_by: M | None = None  # the model that ran the batch (None where no batch ran)
    ran_on: str = ""  # the backend that ran it where not the served one's (a remote backend's local fallback)


# Called once per sample from the batcher thread: (its row or None, error or None, timing).
Done = Callable[[Row | None, BaseException | None, BatchTiming[M]], None]


@dataclass
class _Swap(Generic[M]):
    backend: Backend
    postprocess: Callable[[np.ndarray], np.ndarray]
    scored_by: M
    lock: threading.Lock
    done: threading.Event
    old: Backend | None = None
    cancelled: bool = False  # the caller stopped waiting: the swap must not happen later


@dataclass
class _Item(Generic[M]):
    sample: np.ndarray
    done: Done[M]
    submitted: float


_STOP = object()


class Batcher(Generic[M]):
    """One thread owns the backend. ``submit`` blocks when ``capacity`` samples wait (back-pressure)."""

    def __init__(
        self,
        backend: Backend,
        postprocess: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_delay_ms: float,
        capacity: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        coming: Callable[[], bool] | None = None,
        scored_by: M,
    ) -> None:
        """``coming`` says whether more samples are on their way (inputs still being read and prepared):
        when none are and none wait, a batch starts at once rather than after ``max_delay_ms``.
        ``scored_by`` names the model ``backend`` runs; each batch's timing carries it."""
        self._backend = backend
        self._postprocess = postprocess
        self._scored_by = scored_by
        self._configured_batch = max_batch
        self._max_batch = max(1, min(max_batch, backend.max_batch))
        self._max_delay = max_delay_ms / 1000.0
        self._queue: queue.Queue[_Item[M] | object] = queue.Queue(maxsize=capacity)
        self._on_batch = on_batch
        self._coming = coming or (lambda: True)
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def start(self) -> None:
        self._thread.start()

    def submit(self, sample: np.ndarray, done: Done[M]) -> None:
        self._queue.put(_Item(sample, done, time.perf_counter()))

    def swap(
        self, backend: Backend, postprocess: Callable[[np.ndarray], np.ndarray], scored_by: M, timeout: float
    ) -> Backend | None:
        """Serve with another backend from the next batch on: samples submitted before this call run on
        the old one, samples after it on the new one. Returns the old backend (the caller closes it), or
        None if the batcher did not reach the swap within ``timeout``: then it never happens, and the
        caller still owns ``backend``."""
        swap = _Swap(backend, postprocess, scored_by, threading.Lock(), threading.Event())
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(swap, timeout=timeout)
        except queue.Full:
            return None
        swap.done.wait(max(0.0, deadline - time.monotonic()))
        with swap.lock:
            if not swap.done.is_set():
                swap.cancelled = True
                return None
        return swap.old

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _gather(self, first: _Item[M]) -> tuple[list[_Item[M]], object]:
        """A batch, and the control item (stop, swap) that ended it early, if any."""
        items = [first]
        deadline = time.perf_counter() + self._max_delay
        while len(items) < self._max_batch:
            if self._queue.empty() and not self._coming():
                break  # waiting could not fill the batch: a lone image goes now
            remaining = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(nxt, _Item):
                return items, nxt
            items.append(nxt)
        return items, None

    def _run(self) -> None:
        control: object = None
        while control is not _STOP:
            item = self._queue.get()
            control = None
            if isinstance(item, _Item):
                items, control = self._gather(item)
                self._run_batch(items)
            else:
                control = item
            if isinstance(control, _Swap):
                self._apply(control)

    def _apply(self, swap: _Swap[M]) -> None:
        with swap.lock:
            if swap.cancelled:
                return
            self._swap_in(swap)
            swap.done.set()

    def _swap_in(self, swap: _Swap[M]) -> None:
        swap.old = self._backend
        self._backend, self._postprocess, self._scored_by = swap.backend, swap.postprocess, swap.scored_by
        self._max_batch = max(1, min(self._configured_batch, swap.backend.max_batch))

    def _run_batch(self, items: list[_Item[M]]) -> None:
        started = time.perf_counter()
        ran_on = ""
        try:
            batch = np.stack([it.sample for it in items])
            out = self._backend.run(batch)
            ran_on = out.ran_on
            scores = self._postprocess(out.scores)
            rows: list[Row] | None = [
                Row(scores[i], None if out.heatmap is None else out.heatmap[i]) for i in range(len(items))
            ]
            error: BaseException | None = None
        except Exception as e:  # one bad batch must not stop the service: its members are rejected
            log.exception("inference failed on a batch of %d", len(items))
            rows, error = None, e
        infer_ms = (time.perf_counter() - started) * 1e3
        if self._on_batch is not None:
            self._on_batch(len(items), infer_ms)
        for i, it in enumerate(items):
            timing = BatchTiming(
                queue_ms=(started - it.submitted) * 1e3,
                infer_ms=infer_ms,
                batch_size=len(items),
                scored_by=self._scored_by,
                ran_on=ran_on,
            )
            try:
                it.done(None if rows is None else rows[i], error, timing)
            except Exception:
                log.exception("a batch completion callback failed")
