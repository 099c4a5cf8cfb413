"""The batcher's batching, with the real pipeline-test model: samples that come within the delay run as one batch,
never more than the backend takes at once, and a lone sample is not held for company that does not come.
Each test asserts which batches ran; a timeout only turns a hang into a failure."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.inference.backends.onnxruntime import OnnxRuntimeBackend
from appliance.inference.batcher import Batcher, BatchTiming, Row

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"
BACKEND_MAX = 4  # what the backend takes at once
LONG_S = 3600.0  # a delay no test waits out


@pytest.fixture(scope="module")
def backend() -> Iterator[OnnxRuntimeBackend]:
    backend = OnnxRuntimeBackend(MODEL / "model.onnx", output_name="logit", max_batch=BACKEND_MAX, threads=1)
    backend.load()
    yield backend
    backend.close()


class _Batches:
    """What a batcher ran: each batch's size as it reported it, and each sample's timing."""

    def __init__(self, samples: int) -> None:
        self.sizes: list[int] = []
        self.timings: list[BatchTiming[str]] = []
        self._lock = threading.Lock()
        self._all_done = threading.Event()
        self._samples = samples

    def on_batch(self, size: int, _infer_ms: float) -> None:
        self.sizes.append(size)

    def done(self, row: Row | None, error: BaseException | None, timing: BatchTiming[str]) -> None:
        assert error is None and row is not None
        with self._lock:
            self.timings.append(timing)
            if len(self.timings) == self._samples:
                self._all_done.set()

    def wait(self) -> None:
        assert self._all_done.wait(60), f"{len(self.timings)} of {self._samples} samples came back"


def _batcher(
    backend: OnnxRuntimeBackend,
    batches: _Batches,
    *,
    max_batch: int,
    max_delay_ms: float,
    coming: Callable[[], bool] | None = None,
) -> Batcher[str]:
    return Batcher(
        backend,
        lambda raw: raw,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        on_batch=batches.on_batch,
        coming=coming,
        scored_by="pipeline-test",
    )


def _sample() -> np.ndarray:
    return np.zeros((1, 64, 64), np.float32)


def test_samples_that_come_within_the_delay_run_as_one_batch(backend: OnnxRuntimeBackend) -> None:
    batches = _Batches(BACKEND_MAX)
    # More is said to be coming and the delay is long: the batch waits for the others, and goes once full.
    batcher = _batcher(backend, batches, max_batch=BACKEND_MAX, max_delay_ms=LONG_S * 1e3)
    batcher.start()
    try:
        for _ in range(BACKEND_MAX):
            batcher.submit(_sample(), batches.done)
        batches.wait()
    finally:
        batcher.stop()
    assert batches.sizes == [BACKEND_MAX]
    assert [t.batch_size for t in batches.timings] == [BACKEND_MAX] * BACKEND_MAX
    assert {t.scored_by for t in batches.timings} == {"pipeline-test"}


def test_a_batch_is_never_larger_than_the_backend_takes(backend: OnnxRuntimeBackend) -> None:
    count = BACKEND_MAX + 2
    batches = _Batches(count)
    # Configured for more than the backend takes; all waiting before the batcher starts.
    batcher = _batcher(backend, batches, max_batch=4 * BACKEND_MAX, max_delay_ms=LONG_S * 1e3, coming=lambda: False)
    assert batcher.max_batch == BACKEND_MAX
    for _ in range(count):
        batcher.submit(_sample(), batches.done)
    batcher.start()
    try:
        batches.wait()
    finally:
        batcher.stop()
    assert batches.sizes == [BACKEND_MAX, 2]
    assert sorted(t.batch_size for t in batches.timings) == [2, 2] + [BACKEND_MAX] * BACKEND_MAX


def test_a_lone_sample_is_not_held_past_the_delay_for_company_that_does_not_come(
    backend: OnnxRuntimeBackend,
) -> None:
    batches = _Batches(1)
    # More is said to be coming, and never comes: the delay ends the wait.
    batcher = _batcher(backend, batches, max_batch=BACKEND_MAX, max_delay_ms=50, coming=lambda: True)
    batcher.start()
    try:
        batcher.submit(_sample(), batches.done)
        batches.wait()
    finally:
        batcher.stop()
    assert batches.sizes == [1]


def test_a_lone_sample_goes_at_once_when_nothing_more_is_coming(backend: OnnxRuntimeBackend) -> None:
    batches = _Batches(1)
    # Nothing is on its way: the batch starts without waiting out a delay no test would outlast.
    batcher = _batcher(backend, batches, max_batch=BACKEND_MAX, max_delay_ms=LONG_S * 1e3, coming=lambda: False)
    batcher.start()
    try:
        batcher.submit(_sample(), batches.done)
        batches.wait()
    finally:
        batcher.stop()
    assert batches.sizes == [1]
