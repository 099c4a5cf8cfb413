"""The TensorRT backend's slots, streams and buffers on a real GPU, with a stand-in TensorRT whose engine
computes with CuPy on the backend's own streams (stand_in_tensorrt.py): real copies, real
synchronization, real frees. Runs where a GPU, cuda-python and CuPy are present, TensorRT or not;
`make gpu-check` also runs it under compute-sanitizer where that is on PATH.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.domain.errors import BackendError
from appliance.domain.manifest import Heatmap
from appliance.inference.backends import cuda
from appliance.inference.backends import tensorrt as trt_backend
from appliance.inference.backends.tensorrt import TensorRtBackend

from .stand_in_tensorrt import PLAN, SAMPLE, Behaviour, expected_heatmap, expected_scores, make_module

GPU_PROBLEM = cuda.gpu_problem()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(bool(GPU_PROBLEM), reason=GPU_PROBLEM or "a GPU is usable"),
    pytest.mark.skipif(
        importlib.util.find_spec("cupy") is None,
        reason="CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x); the stand-in engine computes with it",
    ),
]

SPIN_S = 0.3  # a batch held this long on the GPU is still running when the test acts on it


class _TellsWhenWaitedOn(threading.Condition):
    """The slot pool's own condition, which also sets ``waited_on`` when a caller starts waiting on it: set under
    its lock, so whoever takes the lock next finds that caller inside wait()."""

    def __init__(self) -> None:
        super().__init__()
        self.waited_on = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited_on.set()
        return super().wait(timeout)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Behaviour, Path]]:
    module, behaviour = make_module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    # The backend makes its logger from the first `tensorrt` it sees and keeps it; this one is not real.
    monkeypatch.setattr(trt_backend, "_logger", None)
    plan = tmp_path / "stand-in.plan"
    plan.write_bytes(PLAN)
    yield behaviour, plan


def batch(rng: np.random.Generator, n: int) -> np.ndarray:
    # Small integers: every sum is exact in float32, so rows compare exactly whatever the reduction order.
    return rng.integers(-8, 8, size=(n, *SAMPLE)).astype(np.float32)


def slots_of(backend: TensorRtBackend) -> list[Any]:
    """The backend's slots, to look at their buffers across close()."""
    pool = backend._pool
    if pool is None:
        raise AssertionError("the backend is not loaded")
    return list(pool._slots)


def test_many_batches_from_two_threads_come_back_right(stand_in: tuple[Behaviour, Path]) -> None:
    behaviour, plan = stand_in
    behaviour.spin_ns = 200_000  # long enough that the two threads' batches overlap on the GPU
    errors: list[str] = []
    with TensorRtBackend(plan, output_name="scores", max_batch=8) as backend:

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for i in range(60):
                x = batch(rng, int(rng.integers(1, 9)))
                got = backend.infer(x)
                if not np.array_equal(got, expected_scores(x)):
                    errors.append(f"thread {seed}, batch {i} of {len(x)}: wrong rows")

        threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert len(behaviour.streams) == 120
    assert len(set(behaviour.streams)) == 2  # both slots were used


def test_every_output_is_bound_and_only_the_named_one_comes_back(stand_in: tuple[Behaviour, Path]) -> None:
    behaviour, plan = stand_in
    x = batch(np.random.default_rng(3), 5)
    with TensorRtBackend(plan, output_name="scores", max_batch=8) as backend:
        out = backend.run(x)
        context = behaviour.last
        assert set(context.addresses) == {"images", "features", "scores", "heatmap"}
        assert len(set(context.addresses.values())) == 4
        features = context.view("features", np.float16).get()  # after infer: the stream is idle
        assert not backend.has_heatmap  # not asked for: computed (the plan has it) but not copied back
    assert out.scores.shape == (5, 2) and np.array_equal(out.scores, expected_scores(x)) and out.heatmap is None
    np.testing.assert_allclose(features, x.mean(axis=(2, 3)), atol=1e-2)


def test_the_heatmap_comes_back_with_the_scores_from_the_same_batch(stand_in: tuple[Behaviour, Path]) -> None:
    _, plan = stand_in
    rng = np.random.default_rng(7)
    spec = Heatmap(method="cam", feature="features", output="heatmap")
    backend = TensorRtBackend(plan, output_name="scores", max_batch=8, heatmap=spec)
    with backend:
        assert backend.has_heatmap
        for n in (8, 3, 1, 5):  # the shape changes per call; the buffers are sized for the max batch
            x = batch(rng, n)
            out = backend.run(x)
            assert out.heatmap is not None and out.heatmap.shape == (n, *SAMPLE[1:])
            assert np.array_equal(out.scores, expected_scores(x)) and np.array_equal(out.heatmap, expected_heatmap(x))
        slots = slots_of(backend)
    assert all(s.host_heatmap is not None and s.host_heatmap.pointer is None for s in slots)  # freed with the rest


def test_a_plan_without_the_heatmap_is_served_without_one(
    stand_in: tuple[Behaviour, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, plan = stand_in
    spec = Heatmap(method="cam", feature="features", output="where")
    backend = TensorRtBackend(plan, output_name="scores", max_batch=8, heatmap=spec)
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__), backend:
        assert not backend.has_heatmap and backend.run(batch(np.random.default_rng(8), 2)).heatmap is None
    assert "built without the manifest's heatmap" in caplog.text


def test_a_failed_enqueue_waits_for_its_stream_and_leaves_the_slot_usable(
    stand_in: tuple[Behaviour, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cupy

    behaviour, plan = stand_in
    monkeypatch.setattr(trt_backend, "SLOTS", 1)  # so the next batch gets the same slot
    rng = np.random.default_rng(4)
    with TensorRtBackend(plan, output_name="scores", max_batch=8) as backend:
        behaviour.spin_ns, behaviour.fail_next = int(SPIN_S * 1e9), True
        with pytest.raises(BackendError, match="failed to enqueue"):
            backend.infer(batch(rng, 8))
        # Had the slot gone back at once, its stream would still hold the enqueued work.
        assert cupy.cuda.ExternalStream(behaviour.streams[-1]).done
        behaviour.spin_ns = 0
        x = batch(rng, 3)
        assert np.array_equal(backend.infer(x), expected_scores(x))
        assert behaviour.streams[-1] == behaviour.streams[0]


def test_close_waits_for_a_running_batch_and_refuses_waiting_ones(
    stand_in: tuple[Behaviour, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cupy

    behaviour, plan = stand_in
    monkeypatch.setattr(trt_backend, "SLOTS", 1)  # a second caller has to wait for the slot
    x = batch(np.random.default_rng(5), 8)
    results: dict[str, Any] = {}
    backend = TensorRtBackend(plan, output_name="scores", max_batch=8)
    backend.load()
    slots = slots_of(backend)
    assert backend._pool is not None
    backend._pool._cond = condition = _TellsWhenWaitedOn()  # before any caller: nothing holds the old one
    behaviour.spin_ns = int(SPIN_S * 1e9)

    def run(key: str) -> None:
        try:
            results[key] = backend.infer(x)
        except BackendError as e:
            results[key] = e

    running = threading.Thread(target=run, args=("running",))
    running.start()
    assert behaviour.enqueued.wait(10)
    waiting = threading.Thread(target=run, args=("waiting",))
    waiting.start()
    assert condition.waited_on.wait(10)  # the second caller waits for the slot (take()), under close()'s lock next
    backend.close()
    # close() returned only once the running batch had finished: nothing is left on its stream.
    assert cupy.cuda.ExternalStream(behaviour.streams[0]).done
    running.join(10)
    waiting.join(10)
    assert isinstance(results["running"], np.ndarray) and np.array_equal(results["running"], expected_scores(x))
    assert isinstance(results["waiting"], BackendError)
    assert all(s.device_in.pointer is None and s.host_in.pointer is None for s in slots)
    assert all(b.pointer is None for s in slots for b in s.device_outs.values())
    with pytest.raises(BackendError):
        backend.infer(x)


def test_close_leaves_a_stuck_batch_its_buffers(
    stand_in: tuple[Behaviour, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    behaviour, plan = stand_in
    monkeypatch.setattr(trt_backend, "DRAIN_S", 0.05)
    x = batch(np.random.default_rng(6), 4)
    results: dict[str, Any] = {}
    backend = TensorRtBackend(plan, output_name="scores", max_batch=8)
    backend.load()
    slots = slots_of(backend)
    behaviour.spin_ns = int(2 * SPIN_S * 1e9)
    running = threading.Thread(target=lambda: results.setdefault("rows", backend.infer(x)))
    running.start()
    assert behaviour.enqueued.wait(10)
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        backend.close()
    assert "1 of 2 slots still busy" in caplog.text
    busy = [s for s in slots if s.device_in.pointer is not None]
    assert len(busy) == 1  # the idle slot was freed, the busy one left alone
    running.join(10)
    assert np.array_equal(results["rows"], expected_scores(x))  # the batch ran to the end on live buffers
    assert busy[0].device_in.pointer is None  # and gave its slot back to be freed then
