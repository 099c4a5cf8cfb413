"""Adds a heatmap output to an ONNX model: Grad-CAM or CAM in the same graph, with standard operators only.

ONNX Runtime and TensorRT return no gradients, so the gradient of the decided class's logit is written out
as operators, backwards through the head from the logits to the feature maps: each MatMul/Gemm by its
transposed weight (a new initializer), each ReLU by its mask from the forward pass, each constant Mul by its
constant, each Transpose and Reshape undone. The model's own nodes are left untouched and run once; the
heatmap reads their tensors, so the original outputs come out bit for bit as before.

The decided class is the argmax of the logits (the input of a final Softmax/Sigmoid, else the output itself),
per sample; ties go to the first class, as ArgMax breaks them. A model with a single logit (sigmoid with a
threshold) has one class whatever the decision: its map is the gradient of that logit, i.e. the evidence *for*
the finding, so a negative result still shows where the model looked for it.

The feature maps are N x C x H x W; the heatmap is N x H x W, float32, ReLU'd and divided per sample by its
maximum (plus a small epsilon, so an all-zero map stays zero): values in [0, 1]. Every node and initializer
added is named under `{output_name}/`, so later steps (quantization) can tell the branch apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.domain.errors import ModelMismatchError


class HeatmapError(ModelMismatchError):
    """The manifest's heatmap cannot be added to this model: one sentence saying why."""

    code = "heatmap_unsupported"


Method = Literal["gradcam", "cam"]

MIN_OPSET = 13  # Unsqueeze/ReduceSum with axes as inputs; the opsets below are long gone from exporters
EPSILON = 1e-8  # next to a map's maximum (O(1) or more), below float32's resolution: zero stays zero
_END = ("Softmax", "Sigmoid")  # only as the head's last op: the gradient starts at their input, the logits
_LINEAR = ("MatMul", "Gemm")
_POOLS = ("GlobalAveragePool", "ReduceMean")
_RESHAPES = ("Reshape", "Flatten")
_SUPPORTED = ("Transpose", *_RESHAPES, *_LINEAR, "Add", "Mul", "Relu", *_POOLS, *_END)

Dims = list[int | str | None]


@dataclass(frozen=True)
class _Step:
    node: onnx.NodeProto
    data: str  # the input the chain passes through; the node's other inputs are constants
    shape: Dims | None  # the data's, where known: onnx's inference stops at a Reshape to a computed shape


class _Builder:
    """Appends nodes and initializers to a copy of the model under unique names prefixed with the output's."""

    def __init__(self, model: onnx.ModelProto, prefix: str) -> None:
        self.graph = model.graph
        self.prefix = prefix
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self._taken = {n.name for n in self.graph.node} | {i.name for i in self.graph.initializer}
        self._taken |= {t for n in self.graph.node for t in (*n.input, *n.output)}
        self._taken |= {v.name for v in (*self.graph.input, *self.graph.output)}

    def taken(self, name: str) -> bool:
        return name in self._taken

    def name(self, what: str) -> str:
        base = f"{self.prefix}/{what}"
        name, k = base, 1
        while name in self._taken:
            name, k = f"{base}_{k}", k + 1
        self._taken.add(name)
        return name

    def const(self, what: str, value: np.ndarray) -> str:
        name = self.name(what)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], what: str, **attrs: Any) -> str:
        out = self.name(what)
        self.graph.node.append(helper.make_node(op_type, list(inputs), [out], name=self.name(f"{what}_node"), **attrs))
        return out

    def axes(self, axes: Sequence[int]) -> str:
        return self.const("axes", np.array(axes, dtype=np.int64))

    def reduce(self, op_type: str, x: str, axes: Sequence[int], what: str, *, keepdims: bool) -> str:
        # ReduceSum took its axes as an input from opset 13, the other reductions only from 18.
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.axes(axes)], what, keepdims=int(keepdims))
        return self.op(op_type, [x], what, axes=list(axes), keepdims=int(keepdims))


class _Model:
    """What the walk needs to know of the original graph: consumers, constants, shapes, the feature's type."""

    def __init__(self, model: onnx.ModelProto, feature: str) -> None:
        self.graph = model.graph
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in dict.fromkeys(node.input):
                self.consumers.setdefault(name, []).append(node)
        self.constants = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as e:  # onnx raises several types; without shapes the broadcasts cannot be checked
            raise HeatmapError(f"Shape inference failed, so no heatmap can be added: {str(e).splitlines()[0]}") from e
        self.types: dict[str, onnx.TypeProto.Tensor] = {}
        for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type.tensor_type
        self.outputs = {o.name for o in self.graph.output}
        ftype = self.types.get(feature)
        if ftype is None and feature not in self.consumers:
            raise HeatmapError(f"The model has no tensor named {feature!r} to take the feature maps from.")
        if ftype is None or ftype.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            raise HeatmapError(f"{feature!r} is not a floating-point tensor (or its type is unknown).")
        self.elem_type: int = ftype.elem_type  # the head's type: the gradient is computed in it
        self.dtype = helper.tensor_dtype_to_np_dtype(ftype.elem_type)

    def shape(self, name: str) -> Dims | None:
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    def constant(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        if name not in self.constants:
            raise HeatmapError(
                f"The heatmap needs {node.op_type} {node.name!r} to take a constant besides the feature path, "
                f"but {name!r} is computed."
            )
        return self.constants[name]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _walk(m: _Model, feature: str) -> tuple[list[_Step], str]:
    """The chain of nodes from the feature maps to a graph output, and the logits' name."""
    steps: list[_Step] = []
    current = feature
    shape = m.shape(feature)
    while True:
        # A Shape node only feeds a Reshape's target shape: it carries no values, so no gradient.
        users = [n for n in m.consumers.get(current, []) if n.op_type != "Shape"]
        if not users:
            break
        if len(users) > 1:
            ops = ", ".join(f"{n.op_type} {n.name!r}" for n in users)
            raise HeatmapError(
                f"{current!r} feeds {ops}; the heatmap needs one chain from the feature maps to the output."
            )
        node = users[0]
        if node.op_type not in _SUPPORTED:
            raise HeatmapError(
                f"The heatmap cannot pass back through {node.op_type} {node.name!r}: it supports "
                f"{', '.join(_SUPPORTED)} between the feature maps and the output."
            )
        if steps and steps[-1].node.op_type in _END:
            raise HeatmapError(
                f"{steps[-1].node.op_type} {steps[-1].node.name!r} is followed by more: it must end the head."
            )
        steps.append(_Step(node, current, shape))
        current = node.output[0]
        shape = m.shape(current) or _out_shape(steps[-1], m)
    if current not in m.outputs:
        raise HeatmapError(f"The chain from the feature maps ends at {current!r}, which is not an output of the model.")
    if not steps:
        raise HeatmapError(f"{feature!r} is an output itself: no head follows it to explain.")
    logits = current
    if steps[-1].node.op_type in _END:
        logits = steps.pop().data
    return steps, logits


def _prod(dims: Dims) -> int | None:
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


def _out_shape(step: _Step, m: _Model) -> Dims | None:
    """The step's output shape from its input's, as far as it is known (None for a dimension that is not)."""
    node, x = step.node, step.shape
    op = node.op_type
    if x is None:
        return None
    if op in ("Relu", "Add", "Mul", *_END):
        return x
    if op == "Transpose":
        perm = _attr(node, "perm", None) or list(range(len(x)))[::-1]
        return [x[i] for i in perm]
    if op in _LINEAR:
        w = m.constants.get(node.input[1])
        if w is None or w.ndim != 2:
            return None
        return [*x[:-1], w.shape[0] if op == "Gemm" and _attr(node, "transB", 0) else w.shape[1]]
    if op == "Flatten":
        axis = _attr(node, "axis", 1) % max(len(x), 1)
        return [_prod(x[:axis]), _prod(x[axis:])]
    if op == "Reshape":
        target = m.constants.get(node.input[1])
        if target is None:  # computed (tf2onnx's [N, -1] from Shape): only its length is known
            length = m.shape(node.input[1])
            return [None] * length[0] if length and isinstance(length[0], int) else None
        dims: Dims = [x[i] if t == 0 and i < len(x) else int(t) for i, t in enumerate(target.tolist())]
        if -1 in dims:
            total, rest = _prod(x), _prod([d for d in dims if d != -1])
            dims[dims.index(-1)] = total // rest if total is not None and rest else None
        return dims
    if op in _POOLS:
        axes, _ = _axes(step, m)
        keep = op == "GlobalAveragePool" or _attr(node, "keepdims", 1)
        return [1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes]
    return None


def _broadcast_ok(data: Dims | None, const: tuple[int, ...]) -> bool:
    """Whether adding or multiplying the constant leaves the data's shape as it is (so the gradient keeps it)."""
    if data is None or len(const) > len(data):
        return False
    # Unknown or symbolic dimensions pass only against 1: were they 1 at run time, a larger constant would widen them.
    return all(c in (1, d) for c, d in zip(const[::-1], data[::-1], strict=False))


def _axes(step: _Step, m: _Model) -> tuple[list[int], int]:
    """A mean's reduced axes (non-negative) and the data's rank."""
    if step.shape is None:
        raise HeatmapError(f"The rank of {step.data!r} is unknown, so {step.node.name!r} cannot be undone.")
    rank = len(step.shape)
    if step.node.op_type == "GlobalAveragePool":
        return list(range(2, rank)), rank
    axes = _attr(step.node, "axes", None)
    if len(step.node.input) > 1 and step.node.input[1]:
        axes = m.constant(step.node.input[1], step.node).tolist()
    if not axes:
        raise HeatmapError(f"ReduceMean {step.node.name!r} averages every axis, the batch too.")
    return sorted(int(a) % rank for a in axes), rank


def _back(step: _Step, g: str, m: _Model, b: _Builder) -> str:
    """The gradient with respect to the step's data input, given the gradient with respect to its output."""
    node, x = step.node, step.data
    op = node.op_type
    others = [i for i in node.input if i and i != x]
    if op == "Relu":
        # The mask from the ReLU's output, which is > 0 exactly where its input is: the pre-activation gets no
        # new consumer, so ONNX Runtime fuses MatMul+Add+Relu as before and the outputs stay bit for bit.
        zero = b.const("zero", np.zeros((), dtype=m.dtype))
        mask = b.op("Cast", [b.op("Greater", [node.output[0], zero], "relu_mask")], "relu_mask_f", to=m.elem_type)
        return b.op("Mul", [g, mask], "grad")
    if op in ("Add", "Mul"):
        if len(others) != 1:
            raise HeatmapError(
                f"{op} {node.name!r} takes the feature path twice; the heatmap needs one operand constant."
            )
        if not _broadcast_ok(step.shape, m.constant(others[0], node).shape):
            raise HeatmapError(f"{op} {node.name!r} broadcasts {x!r} to a larger shape; the heatmap cannot undo that.")
        return g if op == "Add" else b.op("Mul", [g, others[0]], "grad")
    if op in _LINEAR:
        if node.input[0] != x or (op == "Gemm" and _attr(node, "transA", 0)):
            raise HeatmapError(
                f"{op} {node.name!r} multiplies the feature path from the right; only x @ W is supported."
            )
        w = m.constant(node.input[1], node)
        if w.ndim != 2:
            raise HeatmapError(f"{op} {node.name!r} has a {w.ndim}-D weight; the heatmap supports 2-D ones.")
        if op == "Gemm":
            if len(node.input) > 2 and node.input[2]:
                m.constant(node.input[2], node)  # a computed bias would be another path to differentiate
            w = (w.T if _attr(node, "transB", 0) else w) * np.asarray(_attr(node, "alpha", 1.0), dtype=w.dtype)
        return b.op("MatMul", [g, b.const("weight_t", np.ascontiguousarray(w.T))], "grad")
    if op == "Transpose":
        perm = _attr(node, "perm", None)
        if perm is None:  # the default reverses the axes, and so does its inverse
            return b.op("Transpose", [g], "grad")
        return b.op("Transpose", [g], "grad", perm=[int(i) for i in np.argsort(perm)])
    if op in _RESHAPES:
        return b.op("Reshape", [g, b.op("Shape", [x], "shape")], "grad")
    if op in _POOLS:
        axes, _ = _axes(step, m)
        sizes = [(step.shape or [])[a] for a in axes]
        if not all(isinstance(s, int) for s in sizes):
            raise HeatmapError(f"{op} {node.name!r} averages over axes of unknown size; the heatmap needs them fixed.")
        if op == "ReduceMean" and not _attr(node, "keepdims", 1):
            g = b.op("Unsqueeze", [g, b.axes(axes)], "grad")
        count = np.asarray(np.prod(sizes), dtype=m.dtype)  # type: ignore[arg-type]
        spread = b.op("Expand", [g, b.op("Shape", [x], "shape")], "grad")
        return b.op("Div", [spread, b.const("count", count)], "grad")
    raise HeatmapError(f"The heatmap cannot pass back through {op} {node.name!r}.")  # _walk lets none else through


def _decided(logits: str, m: _Model, b: _Builder) -> str:
    """One-hot of each sample's argmax over the logits' last axis, in the logits' type: the gradient's seed."""
    decided = b.op("ArgMax", [logits], "decided", axis=-1, keepdims=1)
    classes = b.op(
        "Gather", [b.op("Shape", [logits], "logits_shape"), b.const("last", np.array(-1, dtype=np.int64))], "classes"
    )
    zero, one = b.const("start", np.array(0, dtype=np.int64)), b.const("step", np.array(1, dtype=np.int64))
    index = b.op("Range", [zero, classes, one], "class_index")
    return b.op("Cast", [b.op("Equal", [index, decided], "seed_b")], "seed", to=m.elem_type)


def _check_cam(steps: list[_Step], feature: str, m: _Model) -> _Step:
    """The pooling step, after checking the head is pooling, then one linear layer (what CAM is defined on)."""
    ops = [s.node.op_type for s in steps]
    k = 1
    while k < len(ops) and ops[k] in _RESHAPES:
        k += 1
    rest = ops[k:]
    ok = ops[0] in _POOLS and _axes(steps[0], m) == ([2, 3], 4) and rest[:1] in (["MatMul"], ["Gemm"])
    if not ok or rest[1:] not in ([], ["Add"]):
        raise HeatmapError(
            f"CAM needs global average pooling, then one MatMul or Gemm (+ Add) on {feature!r}, but it is followed "
            f"by {' -> '.join(ops)}; use method 'gradcam'."
        )
    return steps[0]


def add_heatmap(
    model: onnx.ModelProto,
    *,
    method: Method,
    feature: str,
    output_name: str = "heatmap",
    expose_gradient: bool = False,
    copy: bool = True,
) -> onnx.ModelProto:
    """A copy of `model` with an output `output_name`: N x H x W, float32, in [0, 1], where the decided class looked.

    Parameters
    ----------
    model
        The float model; not modified.
    method
        "gradcam" for any head of the supported ops (the default VGG16's flatten + dense layers); "cam" for a
        global-average-pooling head with a single linear layer (class activation maps, the weights taken as is).
        On such a head both give the same map: the gradient there is the class's weight over H x W.
    feature
        The tensor holding the last feature maps, N x C x H x W.
    expose_gradient
        Grad-CAM only: also output `{output_name}_gradient`, the decided logit's gradient with respect to the
        feature maps (N x C x H x W), for tests to check against finite differences.
    copy
        False: add to ``model`` itself (a caller that keeps no other use of it saves a copy of the weights).
    """
    if method not in ("gradcam", "cam"):
        raise HeatmapError(f"Unknown heatmap method {method!r}: 'gradcam' or 'cam'.")
    if expose_gradient and method != "gradcam":
        raise HeatmapError("Only Grad-CAM computes a gradient with respect to the feature maps to expose.")
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
    m = _Model(out, feature)
    b = _Builder(out, output_name)
    if b.opset < MIN_OPSET:
        raise HeatmapError(f"The model is opset {b.opset}; the heatmap needs {MIN_OPSET} or later.")
    if any(n.name.startswith(f"{output_name}/") for n in out.graph.node):
        raise HeatmapError(
            f"The model's own nodes are named under {output_name!r}/, which marks the heatmap's branch (kept in "
            "float); choose another heatmap output name."
        )
    for name in (output_name, f"{output_name}_gradient") if expose_gradient else (output_name,):
        if b.taken(name):
            raise HeatmapError(f"The model already has a tensor named {name!r}; choose another heatmap output name.")
    fshape = m.shape(feature)
    if fshape is not None and len(fshape) != 4:
        raise HeatmapError(f"{feature!r} has shape {fshape}; the heatmap needs feature maps N x C x H x W.")

    steps, logits = _walk(m, feature)
    g = _decided(logits, m, b)
    if method == "cam":
        pool = _check_cam(steps, feature, m)
        steps = steps[1:]  # CAM weighs the maps by the class's weights as they are: stop above the pooling
    for step in reversed(steps):
        g = _back(step, g, m, b)
    if method == "cam":
        # The gradient at the pooling's output is the decided class's row of weights, N x C (x 1 x 1).
        squeezed = pool.node.op_type == "ReduceMean" and not _attr(pool.node, "keepdims", 1)
        weights = b.op("Unsqueeze", [g, b.axes([2, 3])], "weights") if squeezed else g
    else:
        weights = b.reduce("ReduceMean", g, [2, 3], "alpha", keepdims=True)  # Grad-CAM's per-channel weight
    cam = b.reduce("ReduceSum", b.op("Mul", [weights, feature], "weighted"), [1], "sum", keepdims=False)
    cam = b.op("Relu", [cam], "relu")
    if m.elem_type != TensorProto.FLOAT:
        cam = b.op("Cast", [cam], "float", to=TensorProto.FLOAT)
    peak = b.reduce("ReduceMax", cam, [1, 2], "peak", keepdims=True)
    peak = b.op("Add", [peak, b.const("epsilon", np.array(EPSILON, dtype=np.float32))], "peak_eps")
    out.graph.node.append(helper.make_node("Div", [cam, peak], [output_name], name=b.name("normalise")))

    n, h, w = (fshape[0], fshape[2], fshape[3]) if fshape else (None, None, None)
    out.graph.output.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [n, h, w]))
    if expose_gradient:
        out.graph.node.append(helper.make_node("Identity", [g], [f"{output_name}_gradient"], name=b.name("gradient")))
        out.graph.output.append(helper.make_tensor_value_info(f"{output_name}_gradient", m.elem_type, fshape))
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:
        raise HeatmapError(f"The model with a heatmap does not check: {str(e).splitlines()[0]}") from e
    return out


# Ops on the way from the input to the feature maps that keep the pixel grid as it is, and those that stride it.
_SAME_GRID = (
    *("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "BatchNormalization", "Identity", "Cast", "Transpose"),
    *("Add", "Sub", "Mul", "Div", "QuantizeLinear", "DequantizeLinear", "Dropout"),
)
_STRIDING = ("Conv", "MaxPool", "AveragePool", "QLinearConv", "ConvInteger")


def feature_stride(model: onnx.ModelProto, feature: str) -> tuple[int, int] | None:
    """How many of the input's pixels lie between neighbouring cells of the feature maps (rows, columns): the
    product of the strides on the path from the input. None where the path holds an op of unknown geometry."""
    produced = {o: n for n in model.graph.node for o in n.output}
    constant = {i.name for i in model.graph.initializer}
    constant |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    inputs = {i.name for i in model.graph.input} - constant
    rows, cols, name = 1, 1, feature
    for _ in range(len(model.graph.node) + 1):
        if name in inputs:
            return rows, cols
        node = produced.get(name)
        if node is None or node.op_type not in (*_SAME_GRID, *_STRIDING):
            return None
        if node.op_type in _STRIDING:
            strides = _attr(node, "strides", [1, 1])
            if len(strides) != 2:
                return None
            rows, cols = rows * int(strides[0]), cols * int(strides[1])
        name = next((i for i in node.input if i and i not in constant), "")
    return None
