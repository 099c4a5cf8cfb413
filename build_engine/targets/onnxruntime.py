"""ONNX Runtime on the CPU: a Q/DQ model quantized with the recipe for this CPU's int8 kernels, keyed to the
CPU class and runtime version it was gated on. Its FP32 is the FP32 ONNX itself, served as is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from appliance.inference import cpu_class
from appliance.inference.backends import onnxruntime as backend
from build_engine.quantize import Recipe, recipe_for
from build_engine.target import BuildTarget

if TYPE_CHECKING:
    from build_engine.build import Attempt, Builder

# What INT8 should reach over FP32 on the CPU, by class (the default model, measured by `make engine`);
# under it the build says why in a sentence.
SPEEDUP_TARGET = {"vnni": 3.0, "saturating": 2.0}


class OnnxRuntimeTarget(BuildTarget):
    name = backend.NAME

    def recipe(self, b: Builder) -> Recipe:
        return recipe_for("onnxruntime", b.recipe_class)  # the CPU's int8 kernels decide the recipe

    def intro(self, b: Builder) -> list[str]:
        forced = "" if b.recipe_class == b.cpu_class else f"; quantizing as for {b.recipe_class} (forced)"
        return [f"cpu       {b.cpu_class}: {cpu_class.describe(b.cpu_class)}{forced}"]

    def refuses(self, precision: str) -> str:
        if precision == "fp16":
            return "FP16 is not built for ONNX Runtime on the CPU (it is slower than FP32 there)."
        return ""

    def inputs(self, b: Builder) -> dict[str, Any]:
        runtime = b.host.of(backend.KIND).onnxruntime_version
        return {"cpu": [b.cpu_class, runtime, self.recipe(b).to_dict()]}

    def speed_notes(self, b: Builder, speedup: float, attempt: Attempt) -> list[str]:
        """A sentence when INT8 is slower over FP32 than this CPU class's int8 kernels usually give."""
        if attempt.precision != "int8" or b.cpu_class not in cpu_class.X86_CLASSES:
            return []
        target = SPEEDUP_TARGET["saturating" if b.cpu_class in cpu_class.SATURATING else "vnni"]
        if speedup >= target:
            return []
        if speedup < 1 or not attempt.excluded:
            why = "the model is too small for int8 math to save more than its quantize and dequantize steps cost"
        else:
            layers = f"{len(attempt.excluded)} layer{'s' if len(attempt.excluded) != 1 else ''}"
            why = f"the {layers} kept in float to pass the gate run at FP32 speed"
        return [f"int8 runs {speedup:.2f}x FP32 on this {b.cpu_class} CPU, under the {target:.0f}x its class "
                f"aims for: {why}"]  # fmt: skip


TARGET = OnnxRuntimeTarget()
