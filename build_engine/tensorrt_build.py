"""A strongly typed TensorRT network from a Q/DQ (or FP16, or FP32) ONNX, serialized to a plan.

One code path for TensorRT 10.x and 11.x. Precision comes from the ONNX itself (explicit quantization),
so no INT8 calibrator and no precision builder flags (calibrators are deprecated since 10.1 and removed
in 11; kINT8/kFP16 deprecated since 10.12 and removed in 11). The one call that differs: 10.x needs the
STRONGLY_TYPED creation flag, 11.x networks are always strongly typed (the flag may be gone).

The one precision switch kept is TF32, which TensorRT turns on by default (10.x and 11.x): it lets float32
matrix products round their inputs to 10-bit mantissas. A plan we call "fp32" clears it, so it computes
what ONNX Runtime FP32 computes.

The heatmap's branch (layers named `{output}/...`, as the parser names them after their ONNX nodes) is kept
in float32 by its ONNX: left out of quantization and out of the FP16 conversion (build_engine/quantize.py).
A strongly typed network takes every layer's type from its ONNX and refuses per-layer precision
(`layer.precision`, `set_output_type`) and OBEY_PRECISION_CONSTRAINTS, so the build checks the types the
parser gave the branch instead of setting them, and refuses a plan whose branch would run in reduced precision.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from appliance.files.durable import write_atomic
from appliance.inference.backends.tensorrt import import_tensorrt, make_logger
from build_engine.errors import BuildError

log = logging.getLogger(__name__)


def _network_flags(trt: Any) -> int:
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


PRECISIONS = ("int8", "fp16", "fp32")
REDUCED = ("HALF", "BF16", "INT8", "FP8", "INT4", "FP4")  # trt.DataType names; each looked up, as versions add them


def _reduced_in_branch(trt: Any, network: Any, prefix: str) -> list[str]:
    """Layers named under `prefix/` with an output in a reduced-precision type: '<layer> (<type>)' each."""
    reduced = {getattr(trt.DataType, name) for name in REDUCED if hasattr(trt.DataType, name)}
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not layer.name.startswith(f"{prefix}/"):
            continue
        for j in range(layer.num_outputs):
            dtype = layer.get_output(j).dtype
            if dtype in reduced:
                found.append(f"{layer.name} ({dtype})")
    return found


def _set_precision(trt: Any, config: Any, precision: str) -> None:
    """Clear TF32 for an fp32 plan; leave int8 and fp16 plans to the types their ONNX holds.

    In an int8 (Q/DQ) or fp16 plan, the layers the gate kept in float keep the float32 type their ONNX
    gives them, and with TF32 on (the default) TensorRT may run their convolutions and matrix products in
    TF32 on Ampere and later; the gate measures the plan as built, TF32 included, so that is what passed.
    """
    if precision not in PRECISIONS:
        raise BuildError(f"Unknown TensorRT precision {precision!r}; one of {', '.join(PRECISIONS)}.")
    if precision != "fp32":
        return
    tf32 = getattr(trt.BuilderFlag, "TF32", None)  # kept in 11.1; looked up in case a later major drops it
    if tf32 is None:
        log.warning("TensorRT %s has no TF32 builder flag; the fp32 plan runs as TensorRT chooses", trt.__version__)
        return
    config.clear_flag(tf32)


def build_plan(
    onnx_path: Path,
    *,
    precision: str = "int8",
    input_name: str,
    sample_shape: tuple[int, ...],
    max_batch: int,
    opt_batch: int,
    workspace_bytes: int,
    timing_cache: Path,
    keep_float: str = "",
) -> bytes:
    """Parse, configure (profile 1..max, workspace, timing cache, TF32 off for fp32), build; raise BuildError.

    ``precision`` is the precision the ONNX was made for ("int8" Q/DQ, "fp16" or "fp32"); the network's
    types come from the ONNX either way, and only "fp32" changes the configuration (no TF32).
    ``keep_float``: the prefix of the layers that must stay in float (the heatmap's branch), checked.
    """
    trt = import_tensorrt()
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for error in errors:
            log.error("TensorRT ONNX parser: %s", error)
        first = errors[0] if errors else "no details"
        raise BuildError(f"TensorRT could not parse {onnx_path.name} ({len(errors)} errors; first: {first}).")
    reduced = _reduced_in_branch(trt, network, keep_float) if keep_float else []
    if reduced:
        raise BuildError(
            f"In {onnx_path.name} the layers under {keep_float}/ must stay in float, but {len(reduced)} output a "
            f"reduced-precision type (first: {reduced[0]}); the ONNX was converted without keeping them."
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _set_precision(trt, config, precision)
    profile = builder.create_optimization_profile()
    opt = max(1, min(opt_batch, max_batch))
    try:
        profile.set_shape(input_name, (1, *sample_shape), (opt, *sample_shape), (max_batch, *sample_shape))
    except RuntimeError as e:  # a wrong name or inconsistent shapes raise rather than return False
        raise BuildError(f"TensorRT refused the batch profile 1..{max_batch} for {input_name!r}: {e}.") from e
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)  # None for a corrupt or foreign cache file
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning(
            "TensorRT cannot use the timing cache %s (corrupt, or another TensorRT/GPU); starting anew", timing_cache
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(
            f"TensorRT could not build an engine from {onnx_path.name}; the TensorRT errors above say why "
            "(often too small a workspace: raise --workspace-mb)."
        )
    write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))
