"""Checks the ONNX model on its own and against its manifest, first: a mismatch costs no calibration time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from appliance.inference.heatmap_graph import HeatmapError, add_heatmap, feature_stride
from appliance.toolkit import LoadedManifest, Manifest, expected_sample_shape
from build_engine.errors import BuildError

MIN_OPSET = 13  # for INT8: per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute)
_DTYPES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


@dataclass(frozen=True)
class ModelFacts:
    opset: int
    input_shape: list[int | str]
    output_shape: list[int | str]
    dynamic_batch: bool
    max_batch: int
    note: str
    heatmap_shape: list[int | str] | None = None  # N x H x W, where the manifest declares a heatmap


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return dims


def check_model(loaded: LoadedManifest, max_batch: int) -> ModelFacts:
    """onnx.checker, shape inference, the manifest's names, shapes and dtypes against the graph, and whether
    its heatmap can be added to it."""
    path = loaded.onnx_path
    manifest = loaded.manifest
    try:
        onnx.checker.check_model(str(path))
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except Exception as e:  # onnx raises several types; each is a model the build cannot use
        raise BuildError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0]}") from e
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BuildError(f"{path} has {len(inputs)} inputs; the appliance needs exactly one.")
    graph_in = inputs[0]
    if graph_in.name != manifest.input.name:
        raise BuildError(f"{path}: the model's input is {graph_in.name!r} but model.toml says {manifest.input.name!r}.")
    in_type = _DTYPES.get(graph_in.type.tensor_type.elem_type, "other")
    if in_type != manifest.input.dtype:
        raise BuildError(f"{path}: the model's input is {in_type} but model.toml says {manifest.input.dtype}.")
    in_dims = _dims(graph_in)
    want = list(expected_sample_shape(loaded))
    if len(in_dims) != 4 or any(isinstance(g, int) and g != w for g, w in zip(in_dims[1:], want, strict=True)):
        raise BuildError(
            f"{path}: the model's input shape is {in_dims} but model.toml ({manifest.input.layout}) implies "
            f"[N, {', '.join(map(str, want))}]."
        )
    outputs = {o.name: o for o in model.graph.output}
    if manifest.output.name not in outputs:
        raise BuildError(
            f"{path} has no output named {manifest.output.name!r} (it has {', '.join(outputs)}); fix model.toml."
        )
    out_dims = _dims(outputs[manifest.output.name])
    labels = len(manifest.output.labels)
    width = out_dims[-1] if out_dims else None
    if isinstance(width, int) and width != labels:
        raise BuildError(f"{path}: the model outputs {width} scores but model.toml names {labels} labels.")
    heatmap_shape = None
    if manifest.heatmap is not None:
        h = manifest.heatmap
        try:
            with_map = add_heatmap(model, method=h.method, feature=h.feature, output_name=h.output)
        except HeatmapError as e:
            why = str(e)
            raise BuildError(f"{path}: the manifest's [heatmap] cannot be added: {why[:1].lower()}{why[1:]}") from e
        heatmap_shape = next(_dims(o) for o in with_map.graph.output if o.name == h.output)
        _check_cells(path, manifest, model, heatmap_shape)
    dynamic = not isinstance(in_dims[0], int)
    if dynamic:
        note = f"dynamic batch axis: batches of 1..{max_batch}"
    elif in_dims[0] == 1:
        max_batch, note = 1, "the batch axis is fixed at 1, so the max batch is 1 (export with a dynamic axis to batch)"
    else:
        raise BuildError(f"{path}: the batch axis is fixed at {in_dims[0]}; export it as dynamic (or 1).")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return ModelFacts(opset, in_dims, out_dims, dynamic, max_batch, note, heatmap_shape)


def _check_cells(path: Path, manifest: Manifest, model: onnx.ModelProto, shape: list[int | str] | None) -> None:
    """The manifest places the heatmap's cells on the input as the graph does: its stride, or the input over the
    grid, is the product of the strides on the way to the feature maps (where the graph tells)."""
    spec, spec_in = manifest.heatmap, manifest.input
    assert spec is not None
    grid = tuple(shape[1:3]) if shape and len(shape) == 3 else ()
    if len(grid) != 2 or not all(isinstance(d, int) for d in grid):
        return  # shapes unknown before a run: the daemon's load checks the grid it gets
    try:
        cell = spec.cell((spec_in.height, spec_in.width), (int(grid[0]), int(grid[1])))
    except ValueError as e:
        raise BuildError(f"{path}: {e}.") from e
    graph = feature_stride(model, spec.feature)
    if graph is not None and graph != cell:
        raise BuildError(
            f"{path}: the heatmap's cells are {graph[0]} x {graph[1]} input pixels apart in the graph, but model.toml "
            f"places them {cell[0]} x {cell[1]} apart; set heatmap.stride = {graph[0]}."
        )
