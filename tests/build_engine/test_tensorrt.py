"""TensorRT for real: build a plan from the default model, run it, compare it with ONNX Runtime; build
small ONNX graphs that pin down one behaviour each (a second output, FP32 without TF32).

Runs where `tensorrt` imports and a GPU is visible; skipped elsewhere with the reason (never faked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.config import LimitsConfig
from appliance.domain.errors import ModelMismatchError
from appliance.domain.manifest import load_manifest
from appliance.inference.artifacts import read_sidecar, sha256_file
from appliance.inference.backends import cuda
from appliance.inference.backends.onnxruntime import OnnxRuntimeBackend
from appliance.inference.backends.tensorrt import TensorRtBackend, is_available, tensorrt_stem, tensorrt_version
from appliance.inference.postprocess import activate
from appliance.prepare.preparer import Preparer
from build_engine.image_sets import load_set
from build_engine.tensorrt_build import build_plan

from ..integration.conftest import DEFAULT_MODEL
from .conftest import build

PROBLEM = is_available()  # what the daemon asks: TensorRT importable and a GPU usable
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "TensorRT and a GPU are usable"),
]
needs_default_model = pytest.mark.skipif(not (DEFAULT_MODEL / "model.onnx").is_file(), reason="run `make model` first")


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


@needs_default_model
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


@needs_default_model
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


@needs_default_model
def test_a_truncated_plan_is_refused_with_make_engine(plans: dict[str, Path], tmp_path: Path) -> None:
    sidecar = read_sidecar(plans["fp16"])
    broken = tmp_path / "broken.plan"
    broken.write_bytes((plans["fp16"].parent / sidecar.artifact).read_bytes()[:4096])
    backend = TensorRtBackend(broken, output_name="dense_3", max_batch=8)
    with pytest.raises(ModelMismatchError, match="run `make engine`"):
        backend.load()
    backend.close()


def _dense_onnx(path: Path, width: int, *, second_output: bool) -> np.ndarray:
    """x [N, width, 1, 1] -> scores [N, 16] = flatten(x) @ w, with optionally an aux output Relu(x) listed
    first; returns w. Opset 17 and IR 8, which the parsers of TensorRT 10 and 11 both read."""
    w = (np.random.default_rng(0).standard_normal((width, 16)) / np.sqrt(width)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
    ]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 16])]
    if second_output:
        nodes.append(helper.make_node("Relu", ["x"], ["aux"]))
        outputs.insert(0, helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", width, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width, 1, 1])],
        outputs,
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return w


def _plan(tmp_path: Path, width: int, *, second_output: bool, precision: str) -> tuple[Path, np.ndarray]:
    onnx_path = tmp_path / "dense.onnx"
    w = _dense_onnx(onnx_path, width, second_output=second_output)
    data = build_plan(onnx_path, precision=precision, input_name="x", sample_shape=(width, 1, 1), max_batch=4,
                      opt_batch=4, workspace_bytes=1 << 30, timing_cache=tmp_path / "dense.timing-cache")  # fmt: skip
    plan = tmp_path / "dense.plan"
    plan.write_bytes(data)
    return plan, w


def test_a_plan_with_a_second_output_binds_it_and_returns_the_named_one(tmp_path: Path) -> None:
    plan, w = _plan(tmp_path, 48, second_output=True, precision="fp32")
    x = np.random.default_rng(1).standard_normal((3, 48, 1, 1)).astype(np.float32)
    with TensorRtBackend(plan, output_name="scores", max_batch=4) as backend:
        for n in (3, 1, 2):  # the shape changes per call; every output is bound each time
            got = backend.infer(x[:n])
            assert got.shape == (n, 16) and got.dtype == np.float32
            np.testing.assert_allclose(got, x[:n].reshape(n, -1) @ w, rtol=1e-4, atol=1e-4)


def test_an_fp32_plan_does_not_round_products_to_tf32(tmp_path: Path) -> None:
    """TF32 rounds inputs to 10-bit mantissas: over 4096 products that is ~1e-3 off; FP32 is ~1e-6 off."""
    plan, w = _plan(tmp_path, 4096, second_output=False, precision="fp32")
    x = np.random.default_rng(2).standard_normal((4, 4096, 1, 1)).astype(np.float32)
    with TensorRtBackend(plan, output_name="scores", max_batch=4) as backend:
        got = backend.infer(x)
    exact = x.reshape(4, -1).astype(np.float64) @ w.astype(np.float64)
    assert np.abs(got - exact).max() < 1e-4
