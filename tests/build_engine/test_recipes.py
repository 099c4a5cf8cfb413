"""The quantization recipe follows the CPU's int8 kernels, and both x86 paths are built and gated on any host."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from appliance.config import LimitsConfig
from appliance.domain.manifest import load_manifest
from appliance.inference import cpu_class
from appliance.inference.artifacts import read_sidecar
from appliance.inference.backends.onnxruntime import onnxruntime_stem
from appliance.prepare.preparer import Preparer
from build_engine.image_sets import load_set
from build_engine.quantize import WEIGHTED_OPS, TensorReader, prepare_float_model, quantize, recipe_for

from .conftest import build

HOST = cpu_class.detect()
RECORD = Path("pipeline-test") / f"{onnxruntime_stem(HOST)}.json"


@pytest.mark.parametrize("name", cpu_class.CLASSES)
def test_seven_bit_weights_exactly_where_int8_kernels_saturate(name: str) -> None:
    recipe = recipe_for("onnxruntime", name)
    assert recipe.reduce_range == (name in ("x86-64", "avx2", "avx512"))
    assert recipe.cpu_class == name and recipe.why
    assert recipe_for("tensorrt").reduce_range is False


def _int8_weight_range(model: Path) -> tuple[int, int]:
    """Smallest and largest stored int8 weight over the model's quantized initializers."""
    graph = onnx.load(str(model)).graph
    values = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    weights = [v for v in values if v.size > 1]  # zero points are scalars
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)


@pytest.mark.parametrize("recipe_class", ["avx2", "avx512-vnni"])
@pytest.mark.slow  # a build of its own
def test_each_x86_recipe_is_built_gated_and_keyed_to_this_host(
    pipeline_model: Path, tmp_path: Path, recipe_class: str
) -> None:
    """One of the two is this host's own recipe, the other forced: both are quantized and recorded here."""
    # Tolerances that pass anything: full 8-bit weights on a CPU without VNNI may well fail a real gate, and
    # this test is about what each recipe writes, not how it scores.
    anything = ("--tolerance", "min_agreement=0", "--tolerance", "max_abs_diff=1", "--tolerance", "mean_abs_diff=1",
                "--tolerance", "max_auc_drop=1", "--tolerance", "min_heatmap_agreement=0")  # fmt: skip
    r = build("--model", pipeline_model, "--engines", tmp_path, "--precision", "int8", *anything,
              "--cpu-class", recipe_class)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    sidecar = read_sidecar(tmp_path / RECORD)
    saturating = recipe_class == "avx2"
    assert sidecar.recipe["chosen_for"] == recipe_class and sidecar.recipe["reduce_range"] is saturating
    assert ("s7 (reduce_range)" in sidecar.recipe["weights"]) is saturating
    # The key says where it was gated, whatever recipe was forced: the daemon serves it only here.
    assert sidecar.key.cpu_class == HOST
    low, high = _int8_weight_range(tmp_path / "pipeline-test" / sidecar.artifact)
    if saturating:
        assert low >= -64 and high <= 64  # 7 bits (symmetric): every u8 x s8 pair sum fits in int16
    else:
        assert low < -64 or high > 64  # the full 8 bits are used
    if recipe_class != HOST:
        assert f"quantizing as for {recipe_class} (forced)" in r.stdout


@pytest.mark.slow  # a build of its own
def test_the_model_s_own_gate_either_passes_or_says_why(pipeline_model: Path, tmp_path: Path) -> None:
    """With pipeline-test's own tolerances the outcome is a figure of this CPU; the behaviour is not."""
    r = build("--model", pipeline_model, "--engines", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    sidecar = read_sidecar(tmp_path / RECORD)
    assert sidecar.gate["passed"]
    if sidecar.key.precision == "int8":
        assert sidecar.self_check is not None and sidecar.recipe["chosen_for"] == HOST
    else:  # FP32 served: a sentence says whether INT8 failed the gate or was slower than FP32
        assert any(n.startswith("INT8 cannot pass the gate here") or "so FP32 is served" in n for n in sidecar.notes)


def test_the_tensorrt_flavour_leaves_the_outputs_of_weighted_ops_in_float(pipeline_model: Path, tmp_path: Path) -> None:
    """As ONNX Runtime's quantizer advises for TensorRT: a Q/DQ after the last Gemm would round the logits
    to int8, and each consumer gets a Q/DQ pair of its own to fuse."""
    float_model = tmp_path / "float.onnx"
    prepare_float_model(pipeline_model / "model.onnx", float_model)
    tensors = load_set(pipeline_model / "calibration", Preparer(load_manifest(pipeline_model).manifest,
                       LimitsConfig()), what="calibration", limit=16).tensors  # fmt: skip
    qdq = tmp_path / "trt.onnx"
    quantize(float_model, qdq, recipe_for("tensorrt"), TensorReader("image", tensors, batch=8))
    graph = onnx.load(str(qdq)).graph
    producers = {out: node for node in graph.node for out in node.output}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED_OPS]
    assert weighted and all(producers[i].op_type == "DequantizeLinear" for n in weighted for i in n.input[:2])
    consumers = [n.op_type for n in graph.node for w in weighted if set(w.output) & set(n.input)]
    assert "QuantizeLinear" not in consumers  # nothing quantizes what a weighted op produces
    (logit,) = [o.name for o in graph.output]
    assert producers[logit].op_type != "DequantizeLinear"  # the scores come out of float math
