"""ONNX Runtime static quantization to Q/DQ ONNX, in the two flavours the targets need, and FP16.

- TensorRT: symmetric int8 activations, per-channel symmetric int8 weights, float biases (TensorRT
  fuses them itself); the outputs of weighted ops are not quantized again (TensorRT fuses the Q/DQ pair
  into the next layer's input; a Q/DQ on the last Gemm would round the logits to int8).
- CPU: symmetric s8 activations, per-channel s8 weights (ONNX Runtime's first choice for Q/DQ, and
  closer to FP32 than u8 activations on the default model). On CPU classes whose int8 kernels
  sum pairs of u8 x s8 products in int16 (x86 without VNNI), full 8-bit weights saturate those sums, so
  the recipe there is 7-bit weights (`reduce_range`), ONNX Runtime's documented remedy.
Both put Q/DQ only on the weighted ops (Conv, Gemm, MatMul): that is where int8 kernels earn their
speed, while Q/DQ around pooling, adds and the softmax cost accuracy for nothing (measured on the default
VGG16: Q/DQ on every op agreed with FP32 on 56% of decisions, on the weighted ops only 98%).
Layers that break the gate are passed in `exclude` and stay in float. So does the heatmap's branch (every node
named under `{output}/`, see appliance/inference/heatmap_graph.py), in every precision: it reads the forward
pass's tensors (dequantized where they were quantized, cast up where they are FP16) and computes in float.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization import qdq_loss_debug as qdq_debug
from onnxruntime.quantization.shape_inference import quant_pre_process

from appliance.inference.cpu_class import SATURATING, describe
from appliance.inference.heatmap_graph import HeatmapError, add_heatmap
from appliance.toolkit import Heatmap
from build_engine import progress
from build_engine.errors import BuildError

log = logging.getLogger(__name__)

Flavour = Literal["onnxruntime", "tensorrt"]


@dataclass(frozen=True)
class Recipe:
    """How a model is quantized, recorded in its sidecar."""

    flavour: Flavour
    cpu_class: str  # the class the recipe was chosen for ('' for TensorRT)
    reduce_range: bool
    why: str

    @property
    def kernels(self) -> str:
        """What the int8 kernels it was made for already do against loss: why INT8 failing is rounding itself."""
        if self.flavour == "tensorrt":
            return "TensorRT's int8 kernels accumulate exactly in int32"
        if self.reduce_range:
            return f"on this {self.cpu_class} CPU the weights were already cut to 7 bits so no sum saturates"
        return f"this {self.cpu_class} CPU's int8 kernels accumulate exactly in int32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "flavour": self.flavour,
            "activations": "s8, symmetric, per tensor (MinMax calibration)",
            "weights": ("s7 (reduce_range)" if self.reduce_range else "s8") + ", symmetric, per channel",
            "quantized_ops": WEIGHTED_OPS,
            "chosen_for": self.cpu_class,
            "reduce_range": self.reduce_range,
            "why": self.why,
        }


def recipe_for(flavour: Flavour, cpu_class: str = "") -> Recipe:
    """The recipe for a TensorRT plan, or for a CPU model on `cpu_class` (see appliance.inference.cpu_class)."""
    if flavour == "tensorrt":
        return Recipe("tensorrt", "", False, "TensorRT's int8 kernels accumulate in int32")
    if cpu_class in SATURATING:
        why = f"{describe(cpu_class)}: 7-bit weights keep the kernels' int16 pair sums from saturating"
        return Recipe("onnxruntime", cpu_class, True, why)
    return Recipe("onnxruntime", cpu_class, False, f"{describe(cpu_class)}: full 8-bit weights")


WEIGHTED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
CALIBRATION_BATCH = 8


class TensorReader(CalibrationDataReader):
    """Feeds the calibration tensors in their fixed order, in batches."""

    def __init__(self, input_name: str, tensors: Sequence[np.ndarray], batch: int) -> None:
        self.input_name = input_name
        self.tensors = list(tensors)
        self.batch = max(1, batch)
        self.taken: Callable[[int], object] | None = None  # told how many tensors each batch held (progress)
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.tensors), self.batch):
            chunk = self.tensors[start : start + self.batch]
            yield {self.input_name: np.stack(chunk)}
            if self.taken is not None:
                self.taken(len(chunk))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def prepare_float_model(source: Path, target: Path, heatmap: Heatmap | None = None) -> str:
    """Shape inference and graph clean-up ORT recommends before quantizing (the raw model if that fails),
    then the manifest's heatmap output, so every artifact made from `target` has it.

    The heatmap goes in after the clean-up: ONNX Runtime's optimizer would rename some of its nodes, and
    the branch is told apart by its names (`{output}/...`) to keep it in float.
    """
    note = ""
    try:
        # ONNX's own shape inference is enough for image CNNs; the symbolic one would add sympy.
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    except Exception as e:  # symbolic shape inference gives up on some graphs; quantizing still works
        onnx.save(onnx.load(str(source)), str(target))
        note = f"pre-processing skipped ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if heatmap is None:
        return note
    try:
        model = add_heatmap(
            onnx.load(str(target)), method=heatmap.method, feature=heatmap.feature, output_name=heatmap.output
        )
    except HeatmapError as e:
        raise BuildError(
            f"The manifest's [heatmap] cannot be added to {source.name} pre-processed for quantizing. {e}"
        ) from e
    onnx.save(model, str(target))
    return note


def branch_nodes(model: Path | onnx.ModelProto, prefix: str) -> list[str]:
    """The nodes named under `prefix/` (the heatmap's branch): kept in float in every precision."""
    if not prefix:
        return []
    graph = (onnx.load(str(model), load_external_data=False) if isinstance(model, Path) else model).graph
    return [n.name for n in graph.node if n.name.startswith(f"{prefix}/")]


def quantize(
    float_model: Path,
    target: Path,
    recipe: Recipe,
    reader: TensorReader,
    exclude: Sequence[str] = (),
    keep_float: str = "",
) -> None:
    """Write the Q/DQ model for `recipe` to `target`; `exclude` and the branch named under `keep_float/` stay float.

    An excluded node's own initializers (the heatmap's transposed weights) are left as they are: only the
    inputs of the nodes it quantizes are.
    """
    if recipe.flavour == "tensorrt":
        # As ONNX Runtime's quantizer advises for TensorRT: no Q/DQ on the outputs of weighted ops, and a
        # Q/DQ pair of its own for each consumer so TensorRT can fuse each into its layer.
        extra: dict[str, Any] = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": WEIGHTED_OPS,
            "DedicatedQDQPair": True,
        }
        options: dict[str, Any] = dict(activation_type=QuantType.QInt8, extra_options=extra)
    else:
        # S8S8, ONNX Runtime's recommended first choice for Q/DQ; on the default model (head in float,
        # the 96 images of validation/) it kept 95 of 96 decisions where u8 activations kept 93.
        options = dict(
            activation_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    reader.rewind()
    try:
        with progress.bar("calibrating", len(reader.tensors)) as calibrating:
            reader.taken = calibrating.update
            quantize_static(
                str(float_model),
                str(target),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=WEIGHTED_OPS,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=recipe.reduce_range,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=[*exclude, *branch_nodes(float_model, keep_float)],
                **options,
            )
            reader.taken = None
    except Exception as e:
        raise BuildError(f"ONNX Runtime could not quantize {float_model.name}: {str(e).splitlines()[0]}") from e


def to_fp16(float_model: Path, target: Path, keep_float: str = "") -> None:
    """FP16 weights and activations inside, FP32 inputs and outputs, as the daemon feeds and reads FP32; the
    branch named under `keep_float/` stays FP32 (it reads the FP16 tensors it needs cast up)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(float_model))
    kept = branch_nodes(model, keep_float)
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=kept or None)
    if kept:
        _drop_round_trips(model)
    onnx.save(model, str(target))


def _drop_round_trips(model: onnx.ModelProto) -> None:
    """Remove the FP32 -> FP16 -> FP32 casts the converter puts between two nodes it leaves in FP32.

    It casts every kept node's float output down to FP16 and each kept consumer casts it back up, so a
    kept branch would still round each of its tensors to FP16. Each such pair is bypassed: the cast up
    reads the FP32 tensor itself (a no-op cast, kept so graph outputs keep their names), and a cast down
    no one reads any longer is dropped.
    """
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    producers = {out: node for node in graph.node for out in node.output}

    def cast_to(node: onnx.NodeProto, to: int) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    for node in graph.node:
        if not cast_to(node, onnx.TensorProto.FLOAT):
            continue
        down = producers.get(node.input[0])
        if (
            down is not None
            and cast_to(down, onnx.TensorProto.FLOAT16)
            and types.get(down.input[0]) == onnx.TensorProto.FLOAT
        ):
            node.input[0] = down.input[0]
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if cast_to(n, onnx.TensorProto.FLOAT16) and n.output[0] not in read]
    for node in dead:
        graph.node.remove(node)
    gone = {n.output[0] for n in dead}
    kept_info = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


@dataclass(frozen=True)
class Sensitivity:
    node: str
    op_type: str
    sqnr_db: float


def rank_sensitive_nodes(
    float_model: Path, qdq_model: Path, reader: TensorReader, samples: int = 4, keep_float: str = ""
) -> list[Sensitivity]:
    """Quantized (weighted) nodes, worst first, by the signal-to-quantization-noise ratio of their inputs."""
    small = TensorReader(reader.input_name, reader.tensors[:samples], batch=1)
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as tmp:
        float_aug, qdq_aug = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        qdq_debug.modify_model_output_intermediate_tensors(str(float_model), str(float_aug))
        qdq_debug.modify_model_output_intermediate_tensors(str(qdq_model), str(qdq_aug))
        float_acts = qdq_debug.collect_activations(str(float_aug), small)
        small.rewind()
        qdq_acts = qdq_debug.collect_activations(str(qdq_aug), small)
    errors = qdq_debug.compute_activation_error(qdq_debug.create_activation_matching(qdq_acts, float_acts))
    ranked = []
    for node in _weighted(float_model, keep_float):
        scores = [errors[name]["qdq_err"] for name in node.input if name in errors]
        if scores:
            ranked.append(Sensitivity(node.name, node.op_type, float(min(scores))))
    return sorted(ranked, key=lambda s: s.sqnr_db)


def _weighted(float_model: Path, keep_float: str) -> list[onnx.NodeProto]:
    """The weighted nodes in graph order, less the branch named under `keep_float/` (never quantized)."""
    graph = onnx.load(str(float_model), load_external_data=False).graph
    prefix = f"{keep_float}/" if keep_float else None
    return [n for n in graph.node if n.op_type in WEIGHTED_OPS and not (prefix and n.name.startswith(prefix))]


def weighted_nodes(float_model: Path, keep_float: str = "") -> list[str]:
    return [n.name for n in _weighted(float_model, keep_float)]


def last_convolutions(float_model: Path, count: int, keep_float: str = "") -> list[str]:
    """The `count` convolutions nearest the classifier: their error reaches the scores with nothing after
    them to average it out. With these and the head in float the default model passes its gate."""
    nodes = _weighted(float_model, keep_float)
    return [n.name for n in nodes if n.op_type in ("Conv", "ConvTranspose")][-count:]


def feature_producer(float_model: Path, feature: str) -> list[str]:
    """The weighted node that makes the feature maps `feature` (through pooling, activations and other
    unweighted ops, following each one's data input), or none."""
    graph = onnx.load(str(float_model), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(feature)
    while node is not None and node.op_type not in WEIGHTED_OPS:
        node = producers.get(node.input[0]) if node.input else None
    return [node.name] if node is not None else []


def classifier_head(float_model: Path, keep_float: str = "") -> list[str]:
    """The weighted nodes after the last convolution (the dense classifier), or the last weighted node.

    The usual first suspects when int8 loses accuracy: few FLOPs, and their error goes straight to the scores.
    """
    nodes = _weighted(float_model, keep_float)
    convs = [i for i, n in enumerate(nodes) if n.op_type in ("Conv", "ConvTranspose")]
    head = nodes[convs[-1] + 1 :] if convs else nodes[-1:]
    return [n.name for n in head]
