"""`make engine` builds the manifest's heatmap into every artifact, keeps its branch in float, and gates its peaks.

On pipeline-test (CAM on its last pooled feature maps, 8 x 8), built for real on this CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from appliance.config import LimitsConfig
from appliance.domain.manifest import load_manifest
from appliance.inference.artifacts import read_sidecar
from appliance.inference.backends.onnxruntime import OnnxRuntimeBackend, onnxruntime_stem
from appliance.inference.cpu_class import detect
from appliance.inference.runs import rows_in_batches
from appliance.prepare.preparer import Preparer
from build_engine.gate import peaks_agree
from build_engine.image_sets import load_set
from build_engine.quantize import branch_nodes, feature_producer, prepare_float_model, to_fp16

from .conftest import INT8, build, drop_heatmap

RECORD = Path("pipeline-test") / f"{onnxruntime_stem(detect())}.json"
BRANCH = "heatmap/"
# What int8 arithmetic looks like in a graph: none of it may be in the heatmap's branch.
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}


def _artifact(engines: Path) -> Path:
    return engines / "pipeline-test" / read_sidecar(engines / RECORD).artifact


def _validation_outputs(model: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Scores and heatmaps on the gate's validation images, through the backend the daemon serves with."""
    manifest = load_manifest(model).manifest
    images = load_set(model / "validation", Preparer(manifest, LimitsConfig()), what="validation", limit=256)
    with OnnxRuntimeBackend(path, output_name="logit", max_batch=16, heatmap=manifest.heatmap) as backend:
        assert backend.has_heatmap
        rows = rows_in_batches(backend, images.tensors, manifest.output.activation)
    heatmaps = [row.heatmap for row in rows if row.heatmap is not None]
    assert len(heatmaps) == len(rows)
    return np.stack([row.scores for row in rows]), np.stack(heatmaps)


def test_the_int8_artifact_has_the_heatmap_output(int8_engines: Path) -> None:
    graph = onnx.load(str(_artifact(int8_engines))).graph
    outputs = {o.name: o for o in graph.output}
    assert list(outputs) == ["logit", "heatmap"]
    assert outputs["heatmap"].type.tensor_type.elem_type == TensorProto.FLOAT


def test_the_heatmap_branch_of_the_int8_artifact_is_all_float(int8_engines: Path) -> None:
    graph = onnx.load(str(_artifact(int8_engines))).graph
    branch = [n for n in graph.node if n.name.startswith(BRANCH)]
    assert branch and not [n.op_type for n in branch if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")]
    producers = {out: n for n in graph.node for out in n.output}
    # It reads the forward pass's tensors (the logits dequantized, as the scores are) but never a quantized one.
    assert all(producers[i].op_type != "QuantizeLinear" for n in branch for i in n.input if i in producers)
    # Its own initializers (the class weights transposed, constants) stay float, and no Q/DQ reads them.
    initializers = {i.name: i for i in graph.initializer if i.name.startswith(BRANCH)}
    assert "heatmap/weight_t" in initializers
    assert {i.data_type for i in initializers.values()} <= {TensorProto.FLOAT, TensorProto.INT64}
    assert not [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and set(n.input) & set(initializers)]
    # The forward pass is quantized all the same.
    assert any(n.op_type == "QuantizeLinear" for n in graph.node if not n.name.startswith(BRANCH))


def test_the_sidecar_gate_records_the_heatmap_agreement(int8_engines: Path) -> None:
    gate = read_sidecar(int8_engines / RECORD).gate
    assert gate["passed"] and 0 <= gate["heatmap_agreement"] <= 1  # the figure itself depends on the int8 kernels
    assert gate["heatmap_agreement"] >= gate["tolerance"]["min_heatmap_agreement"]
    assert gate["heatmap_disagreements"] == round((1 - gate["heatmap_agreement"]) * gate["images"])


def test_the_served_artifact_s_heatmaps_agree_with_fp32_at_the_gated_rate(
    pipeline_model: Path, int8_engines: Path
) -> None:
    gate = read_sidecar(int8_engines / RECORD).gate
    fp32_scores, fp32_maps = _validation_outputs(pipeline_model, pipeline_model / "model.onnx")
    _, maps = _validation_outputs(pipeline_model, _artifact(int8_engines))
    assert maps.shape == fp32_maps.shape == (gate["images"], 8, 8) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    agree = peaks_agree(fp32_maps, maps)
    assert agree.mean() >= gate["tolerance"]["min_heatmap_agreement"]
    assert int((~agree).sum()) == gate["heatmap_disagreements"]  # what the gate measured: the same kernels
    assert not np.array_equal(maps, fp32_maps)  # it really is the int8 model's heatmap
    # Where the model found the disc, its heatmap points where FP32's does.
    found = fp32_scores[:, 0] >= 0.5
    assert found.any() and agree[found].mean() >= gate["tolerance"]["min_heatmap_agreement"]


@pytest.mark.slow  # a build of its own
def test_an_artifact_built_before_the_manifest_declared_a_heatmap_is_rebuilt(
    pipeline_model: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(pipeline_model, model)
    manifest = (model / "model.toml").read_text()
    drop_heatmap(model)
    engines = tmp_path / "engines"
    r = build("--model", model, "--engines", engines, *INT8)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "heatmap peaks" not in r.stdout
    assert [o.name for o in onnx.load(str(_artifact(engines))).graph.output] == ["logit"]

    (model / "model.toml").write_text(manifest)
    r = build("--model", model, "--engines", engines, *INT8)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "up to date" not in r.stdout and "heatmap peaks" in r.stdout
    assert [o.name for o in onnx.load(str(_artifact(engines))).graph.output] == ["logit", "heatmap"]


def test_fp16_keeps_the_heatmap_branch_in_float(pipeline_model: Path, tmp_path: Path) -> None:
    """The ONNX a TensorRT FP16 plan is built from: the converter would round each tensor between two kept
    nodes to FP16 and back; none of the branch's tensors may be FP16."""
    manifest = load_manifest(pipeline_model).manifest
    float_model, fp16 = tmp_path / "float.onnx", tmp_path / "fp16.onnx"
    prepare_float_model(pipeline_model / "model.onnx", float_model, manifest.heatmap)
    to_fp16(float_model, fp16, keep_float="heatmap")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16)))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types |= {i.name: i.data_type for i in graph.initializer}
    branch = [n for n in graph.node if n.name in branch_nodes(float_model, "heatmap")]
    assert branch and not [
        (n.name, t) for n in branch for t in (*n.input, *n.output) if types[t] == TensorProto.FLOAT16
    ]
    (last,) = [n for n in graph.node if "heatmap" in n.output]
    assert all(types[t] == TensorProto.FLOAT for t in last.input)  # the map itself never passes through FP16
    assert any(t == TensorProto.FLOAT16 for t in types.values())  # the forward pass is FP16
    _, fp32_maps = _validation_outputs(pipeline_model, float_model)
    _, maps = _validation_outputs(pipeline_model, fp16)
    assert maps.shape == fp32_maps.shape and maps.dtype == np.float32


def test_the_layer_that_makes_the_feature_maps_is_found(pipeline_model: Path, tmp_path: Path) -> None:
    """Kept in float, after the head, where the heatmap's peaks fail the gate."""
    float_model = tmp_path / "float.onnx"
    prepare_float_model(pipeline_model / "model.onnx", float_model, load_manifest(pipeline_model).manifest.heatmap)
    assert feature_producer(float_model, "/features/features.8/MaxPool_output_0") == ["/features/features.6/Conv"]
    assert feature_producer(float_model, "image") == []


def test_a_heatmap_the_graph_cannot_give_is_refused_before_calibrating(pipeline_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(pipeline_model, model, ignore=shutil.ignore_patterns("calibration", "validation"))
    manifest = model / "model.toml"
    # An earlier pooling: convolutions follow it, which the heatmap cannot pass back through.
    manifest.write_text(manifest.read_text().replace("features.8/MaxPool", "features.2/MaxPool"))
    r = build("--model", model, "--engines", tmp_path / "e")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "the manifest's [heatmap] cannot be added: the heatmap cannot pass back through Conv" in r.stderr
    assert "calibrate" not in r.stdout


def test_the_heatmap_s_cells_are_placed_as_the_graph_strides_them() -> None:
    """VGG16's five pools put its cells 32 input pixels apart: model.toml must say so, since 240 is not 7 of them."""
    from appliance.domain.manifest import LoadedManifest
    from build_engine.errors import BuildError
    from build_engine.model_check import check_model

    brain = load_manifest(Path(__file__).resolve().parents[2] / "models" / "brain-mri-vgg16")
    assert check_model(brain, 8).heatmap_shape is not None  # the bundled stride, 32, is the graph's
    spec = brain.manifest.heatmap
    assert spec is not None

    def with_stride(stride: int | None) -> LoadedManifest:
        manifest = brain.manifest.model_copy(update={"heatmap": spec.model_copy(update={"stride": stride})})
        return LoadedManifest(manifest=manifest, folder=brain.folder)

    with pytest.raises(BuildError, match=r"declare heatmap\.stride"):
        check_model(with_stride(None), 8)
    with pytest.raises(BuildError, match=r"32 x 32 input pixels apart in the graph.*set heatmap.stride = 32"):
        check_model(with_stride(31), 8)
