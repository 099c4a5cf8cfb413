"""TensorRT for real: build a plan from the default model, run it, compare it with ONNX Runtime; build
small ONNX graphs that pin down one behaviour each (a second output, FP32 without TF32); build pipeline-test
with its heatmap in each precision and get the heatmap back from the same call.

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
from build_engine.errors import BuildError
from build_engine.gate import peaks_agree
from build_engine.image_sets import load_set
from build_engine.quantize import TensorReader, prepare_float_model, quantize, recipe_for, to_fp16
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


def _pipeline_plan(pipeline_model: Path, tmp_path: Path, precision: str) -> tuple[Path, Path]:
    """pipeline-test's plan for `precision` made as `make engine` makes it (heatmap added, its branch in
    float), and the float model with the heatmap it was made from."""
    manifest = load_manifest(pipeline_model).manifest
    float_model = tmp_path / "float.onnx"
    prepare_float_model(pipeline_model / "model.onnx", float_model, manifest.heatmap)
    source = float_model
    if precision == "fp16":
        source = tmp_path / "fp16.onnx"
        to_fp16(float_model, source, keep_float="heatmap")
    elif precision == "int8":
        source = tmp_path / "int8.qdq.onnx"
        calibration = load_set(pipeline_model / "calibration", Preparer(manifest, LimitsConfig()), what="c", limit=32)
        reader = TensorReader("image", calibration.tensors, batch=8)
        quantize(float_model, source, recipe_for("tensorrt"), reader, keep_float="heatmap")
    plan = tmp_path / f"{precision}.plan"
    plan.write_bytes(build_plan(source, precision=precision, input_name="image", sample_shape=(1, 64, 64),
                                max_batch=16, opt_batch=16, workspace_bytes=1 << 30,
                                timing_cache=tmp_path / "timing-cache", keep_float="heatmap"))  # fmt: skip
    return plan, float_model


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_plan_returns_the_heatmap_beside_the_scores(pipeline_model: Path, tmp_path: Path, precision: str) -> None:
    manifest = load_manifest(pipeline_model).manifest
    plan, float_model = _pipeline_plan(pipeline_model, tmp_path, precision)
    images = load_set(pipeline_model / "validation", Preparer(manifest, LimitsConfig()), what="v", limit=64).tensors
    got_scores, got, want_scores, want = [], [], [], []
    with (
        TensorRtBackend(plan, output_name="logit", max_batch=16, heatmap=manifest.heatmap) as trt,
        OnnxRuntimeBackend(float_model, output_name="logit", max_batch=16, heatmap=manifest.heatmap) as ort,
    ):
        assert trt.has_heatmap
        for start in range(0, len(images), 7):  # odd batch sizes: the shape changes per call
            batch = np.stack(images[start : start + 7])
            out, ref = trt.run(batch), ort.run(batch)
            assert out.heatmap is not None and ref.heatmap is not None
            got_scores.append(out.scores)
            got.append(out.heatmap)
            want_scores.append(ref.scores)
            want.append(ref.heatmap)
    maps, fp32 = np.concatenate(got), np.concatenate(want)
    assert maps.shape == fp32.shape == (len(images), 8, 8) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    if precision == "fp32":  # no TF32: what ONNX Runtime computes
        np.testing.assert_allclose(maps, fp32, atol=1e-3)
    # Where the model found the disc its map has one clear peak, and the plan's must point at it.
    found = activate(np.concatenate(want_scores), manifest.output.activation)[:, 0] >= 0.5
    assert found.any() and peaks_agree(fp32[found], maps[found]).mean() >= 0.9
    with TensorRtBackend(plan, output_name="logit", max_batch=16) as trt:  # not asked for: not returned
        assert not trt.has_heatmap and trt.run(np.stack(images[:3])).heatmap is None


def test_a_heatmap_branch_converted_to_fp16_is_refused(pipeline_model: Path, tmp_path: Path) -> None:
    """The plan must keep the branch in float; an ONNX converted without keeping it is refused, not built."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    float_model = tmp_path / "float.onnx"
    prepare_float_model(pipeline_model / "model.onnx", float_model, load_manifest(pipeline_model).manifest.heatmap)
    all_fp16 = tmp_path / "all-fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(float_model)), keep_io_types=True), str(all_fp16))
    with pytest.raises(BuildError, match="the layers under heatmap/ must stay in float"):
        build_plan(all_fp16, precision="fp16", input_name="image", sample_shape=(1, 64, 64), max_batch=4, opt_batch=4,
                   workspace_bytes=1 << 30, timing_cache=tmp_path / "tc", keep_float="heatmap")  # fmt: skip
