"""The batcher's model swap (hot reload), with the real pipeline-test model: samples before the swap run on
the old backend, samples after on the new, and a swap the caller gave up on never happens."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from appliance.inference.backends.onnxruntime import OnnxRuntimeBackend
from appliance.inference.batcher import Batcher, BatchTiming

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"


def _backend() -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(MODEL / "model.onnx", output_name="logit", max_batch=4, threads=1)
    backend.load()
    return backend


def _score(batcher: Batcher[str]) -> BatchTiming[str]:
    done = threading.Event()
    got: list[BatchTiming[str]] = []

    def finished(scores: np.ndarray | None, error: BaseException | None, timing: BatchTiming[str]) -> None:
        assert error is None and scores is not None
        got.append(timing)
        done.set()

    batcher.submit(np.zeros((1, 64, 64), np.float32), finished)
    assert done.wait(60)
    return got[0]


def test_samples_run_on_the_model_in_place_when_they_were_submitted() -> None:
    old, new = _backend(), _backend()
    batcher = Batcher(old, lambda raw: raw, max_batch=4, max_delay_ms=1, scored_by="v1")
    batcher.start()
    try:
        assert _score(batcher).scored_by == "v1"
        returned = batcher.swap(new, lambda raw: raw, "v2", timeout=60)
        assert returned is old
        assert _score(batcher).scored_by == "v2"
    finally:
        batcher.stop()
        old.close()
        new.close()


def test_a_swap_given_up_on_never_happens() -> None:
    old, new = _backend(), _backend()
    batcher = Batcher(old, lambda raw: raw, max_batch=4, max_delay_ms=1, scored_by="v1")
    # Not started yet: the swap waits in the queue, and the caller gives up on it (and closes `new`).
    assert batcher.swap(new, lambda raw: raw, "v2", timeout=0.05) is None
    new.close()
    batcher.start()
    try:
        assert _score(batcher).scored_by == "v1"  # the batcher reached the swap later and skipped it
    finally:
        batcher.stop()
        old.close()
