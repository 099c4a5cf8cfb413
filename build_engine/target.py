"""What `make engine` does differently for one backend: the interface each file in `build_engine/targets/`
implements, and how the build finds the one for a registry name (`build_engine/targets/<name>.py`).

The build itself (calibrate, quantize, gate, fall back, publish) is the same for every backend; a target
says only what differs: its quantization recipe, how an ONNX becomes its artifact, the artifact's name,
and what else about it the inputs hash, the sidecar and the report hold. The defaults fit a backend whose
artifact is the ONNX model the build gives it.
"""

from __future__ import annotations

import abc
import importlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.inference import registry
from appliance.inference.backend import BackendKind

if TYPE_CHECKING:
    from build_engine.build import Attempt, Builder
    from build_engine.quantize import Recipe

# The inputs hash's keys for one target's settings from before targets had files, each None but the
# target's own: kept, so that `make engine` reuses what it built then instead of rebuilding it once.
EARLIER_INPUT_KEYS = ("workspace_mb", "tensorrt", "cpu")


class BuildTarget(abc.ABC):
    """One backend's part of `make engine`: subclassed in build_engine/targets/<name>.py, which ends in
    `TARGET = <its class>()`."""

    name: str  # its backend's name in the registry, and its file's under build_engine/targets/
    suffix = ".onnx"  # its artifact's

    @property
    def kind(self) -> BackendKind[Any]:
        return registry.get(self.name)

    @abc.abstractmethod
    def recipe(self, b: Builder) -> Recipe:
        """How its int8 models are quantized (recorded in the sidecar)."""

    def intro(self, b: Builder) -> list[str]:
        """What the report says about this host for it, before the images are read."""
        return []

    def refuses(self, precision: str) -> str:
        """Why it never builds `precision`, when `--precision` asks for it; '' where it does."""
        return ""

    def inputs(self, b: Builder) -> dict[str, Any]:
        """Its own settings and host facts in the inputs hash: a change in any rebuilds instead of reusing."""
        return {}

    def make(self, b: Builder, onnx_path: Path, precision: str, work: Path) -> Path:
        """Its artifact, in `work`, from an ONNX made for `precision` (Q/DQ int8, FP16 or FP32)."""
        return onnx_path

    def artifact_stem(self, stem: str, precision: str) -> str:
        """Its published artifact's name, less the suffix, from its sidecar's stem."""
        return f"{stem}-{precision}"

    def opt_batch(self, b: Builder) -> int:
        """The batch its kernels were tuned for, in the sidecar; 0 where nothing is tuned for one."""
        return 0

    def speed_notes(self, b: Builder, speedup: float, attempt: Attempt) -> list[str]:
        """Sentences for the sidecar when the artifact is slower over FP32 than it should be."""
        return []


@cache
def target_for(name: str) -> BuildTarget:
    """The build target of the registry's backend `name`: `TARGET` in build_engine/targets/<name>.py."""
    where = f"build_engine/targets/{name}.py"
    try:
        module = importlib.import_module(f"build_engine.targets.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"build_engine.targets.{name}":
            raise  # one of the target's own imports
        raise TypeError(f"{where} is missing; every backend in the registry needs a build target.") from e
    target = getattr(module, "TARGET", None)
    if not isinstance(target, BuildTarget) or target.name != name:
        raise TypeError(f"{where} declares no TARGET = BuildTarget(...) named {name!r}; every target must.")
    return target
