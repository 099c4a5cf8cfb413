"""TensorRT on the GPU: a plan built from the ONNX made for each precision (Q/DQ int8, FP16, FP32 without
TF32), its kernels tuned for `--opt-batch` within `--workspace-mb`, keyed to the GPU and TensorRT version.
The ONNX holds the manifest's heatmap with its branch in float32, which the plan keeps (tensorrt_build.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.inference.artifacts import TIMING_CACHE
from appliance.inference.backends import tensorrt as backend
from appliance.toolkit import expected_sample_shape
from build_engine.quantize import Recipe, recipe_for
from build_engine.target import BuildTarget
from build_engine.tensorrt_build import build_plan

if TYPE_CHECKING:
    from build_engine.build import Builder


class TensorRtTarget(BuildTarget):
    name = backend.NAME
    suffix = ".plan"

    def recipe(self, b: Builder) -> Recipe:
        return recipe_for("tensorrt")

    def inputs(self, b: Builder) -> dict[str, Any]:
        host = b.host.of(backend.KIND)
        return {"workspace_mb": b.o.workspace_mb, "tensorrt": [host.tensorrt_version, backend.KIND.host_key(host)]}

    def make(self, b: Builder, onnx_path: Path, precision: str, work: Path) -> Path:
        assert b.facts is not None
        plan = work / f"{precision}.plan"
        plan.write_bytes(
            build_plan(
                onnx_path,
                precision=precision,
                input_name=b.manifest.input.name,
                sample_shape=expected_sample_shape(b.loaded),
                max_batch=b.facts.max_batch,
                opt_batch=self.opt_batch(b),
                workspace_bytes=b.o.workspace_mb << 20,
                # Beside the model folders, one per GPU: every model built on this GPU reuses its timings.
                timing_cache=b.o.engines_dir / f"{b.sidecar_path(self).stem}.{TIMING_CACHE}",
                keep_float=b.float_branch,
            )
        )
        return plan

    def artifact_stem(self, stem: str, precision: str) -> str:
        return stem  # one plan per GPU in a folder; its precision is in the sidecar

    def opt_batch(self, b: Builder) -> int:
        assert b.facts is not None
        return b.o.opt_batch or b.facts.max_batch


TARGET = TensorRtTarget()
