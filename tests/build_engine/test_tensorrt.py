"""TensorRT for real: build a plan from the default model, run it, compare it with ONNX Runtime.

Runs where `tensorrt` imports and a GPU is visible; skipped elsewhere with the reason (never faked).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from appliance.config import LimitsConfig
from appliance.errors import ModelMismatchError
from appliance.inference import cuda
from appliance.inference.artifacts import read_sidecar, sha256_file, tensorrt_stem
from appliance.inference.onnxruntime import OnnxRuntimeBackend
from appliance.inference.postprocess import activate
from appliance.inference.tensorrt import TensorRtBackend, tensorrt_version
from appliance.manifest import load_manifest
from appliance.pipeline import Preparer
from build_engine.image_sets import load_set

from ..integration.conftest import DEFAULT_MODEL
from .conftest import build

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed"),
    pytest.mark.skipif(cuda.gpu_count() == 0, reason="no CUDA GPU (or no cuda-python)"),
    pytest.mark.skipif(not (DEFAULT_MODEL / "model.onnx").is_file(), reason="run `make model` first"),
]


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An INT8 and an FP16 plan of the default model, built as `make engine` builds them."""
    gpu = cuda.gpu_info(0)
    stem = tensorrt_stem(gpu.name, gpu.compute_capability)
    out = {}
    for precision in ("int8", "fp16"):
        engines = tmp_path_factory.mktemp(f"engines-{precision}")
        r = build("--model", DEFAULT_MODEL, "--engines", engines, "--target", "tensorrt", "--precision", precision,
                  "--calibration-count", 32, "--validation-count", 48)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        out[precision] = engines / "brain-mri-vgg16" / f"{stem}.json"
    return out


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_plan_sidecar_is_keyed_to_this_gpu_and_tensorrt(plans: dict[str, Path], precision: str) -> None:
    sidecar = read_sidecar(plans[precision])
    gpu = cuda.gpu_info(0)
    assert sidecar.key.backend == "tensorrt" and sidecar.key.precision == precision
    assert sidecar.key.gpu_name == gpu.name and sidecar.key.compute_capability == gpu.compute_capability
    assert sidecar.key.tensorrt_version == tensorrt_version()
    assert sidecar.key.onnx_sha256 == sha256_file(DEFAULT_MODEL / "model.onnx")
    plan = plans[precision].parent / sidecar.artifact
    assert sidecar.artifact_sha256 == sha256_file(plan)
    assert (plans[precision].parents[1] / f"{plans[precision].stem}.timing-cache").is_file()
    assert sidecar.gate["passed"] and sidecar.throughput["artifact_img_s"] > 0


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_engine_agrees_with_onnx_runtime_on_real_mr(plans: dict[str, Path], precision: str) -> None:
    loaded = load_manifest(DEFAULT_MODEL)
    m = loaded.manifest
    images = load_set(DEFAULT_MODEL / "calibration", Preparer(m, LimitsConfig()), what="test", limit=24)
    sidecar = read_sidecar(plans[precision])
    with (
        TensorRtBackend(plans[precision].parent / sidecar.artifact, output_name=m.output.name, max_batch=8) as trt,
        OnnxRuntimeBackend(loaded.onnx_path, output_name=m.output.name, max_batch=8) as ort,
    ):
        got, want = [], []
        for start in range(0, 24, 5):  # odd batch sizes: the shape changes per call
            batch = np.stack(images.tensors[start : start + 5])
            got.append(activate(trt.infer(batch), m.output.activation))
            want.append(activate(ort.infer(batch), m.output.activation))
    got_all, want_all = np.concatenate(got), np.concatenate(want)
    assert np.abs(got_all - want_all).max() <= m.accuracy.max_abs_diff
    assert (got_all.argmax(1) == want_all.argmax(1)).mean() >= 0.9


def test_a_truncated_plan_is_refused_with_make_engine(plans: dict[str, Path], tmp_path: Path) -> None:
    sidecar = read_sidecar(plans["fp16"])
    broken = tmp_path / "broken.plan"
    broken.write_bytes((plans["fp16"].parent / sidecar.artifact).read_bytes()[:4096])
    backend = TensorRtBackend(broken, output_name="dense_3", max_batch=8)
    with pytest.raises(ModelMismatchError, match="run `make engine`"):
        backend.load()
    backend.close()
