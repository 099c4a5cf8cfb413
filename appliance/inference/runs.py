"""Running a backend over many samples: in chunks of its max batch, and timed for images per second."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from appliance.inference.backend import Backend
from appliance.inference.batcher import Row
from appliance.inference.postprocess import activate


def rows_in_batches(
    backend: Backend, tensors: Sequence[np.ndarray], activation: str, done: Callable[[int], object] | None = None
) -> list[Row]:
    """Each sample's activated scores and heatmap (where the backend gives one), in chunks as the batcher sends.
    ``done`` is told how many samples each chunk ran (make engine's progress)."""
    rows: list[Row] = []
    for start in range(0, len(tensors), backend.max_batch):
        out = backend.run(np.stack(tensors[start : start + backend.max_batch]))
        scores = activate(out.scores, activation)
        rows += [Row(scores[i], None if out.heatmap is None else out.heatmap[i]) for i in range(len(scores))]
        if done is not None:
            done(len(scores))
    return rows


def images_per_second(
    backend: Backend,
    samples: Sequence[np.ndarray],
    batch: int | None = None,
    min_seconds: float = 1.5,
    min_runs: int = 3,
) -> float:
    """Throughput for batches of `batch` (default: the max) real samples, no I/O, after one warm-up batch."""
    size = min(batch or backend.max_batch, backend.max_batch)
    stack = np.stack([samples[i % len(samples)] for i in range(size)])
    backend.infer(stack)
    runs, start = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < min_seconds:
        backend.infer(stack)
        runs += 1
    return runs * size / (time.perf_counter() - start)
