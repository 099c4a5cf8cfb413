"""The inference backends the appliance knows, one file each under `appliance/inference/backends/`.

Adding one touches:
- `appliance/inference/backends/<name>.py`, ending in `KIND = BackendKind(...)`: its settings, whether it
  runs here, its facts about this host (`probe`), which of its artifacts this host may serve, how it opens one;
- its module's line in MODULES below;
- `build_engine/targets/<name>.py`, ending in `TARGET = ...`: what `make engine` does differently for it
  (recipe, artifact, file name), found by the backend's name;
- their tests.
The loader, the artifact choice (`selection.Host` holds each backend's facts by name), config validation and
`make engine` ask this list, never a backend's name. Modules are imported on first use, so reading a config
(the client does) does not load ONNX Runtime.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from appliance.inference.backend import BackendKind

AUTO = "auto"  # not a backend: `inference.backend = "auto"` serves the best artifact of any of them

# In `make engine`'s build order: the reference first, as every other artifact is gated against it.
MODULES = (
    "appliance.inference.backends.onnxruntime",
    "appliance.inference.backends.tensorrt",
    "appliance.inference.backends.triton",
)


@cache
def kinds() -> tuple[BackendKind[Any], ...]:
    """Every backend, in `make engine`'s build order."""
    found = []
    for name in MODULES:
        kind = getattr(importlib.import_module(name), "KIND", None)
        if not isinstance(kind, BackendKind):
            raise TypeError(f"{name} declares no KIND = BackendKind(...); every backend module must.")
        found.append(kind)
    return tuple(found)


def names() -> tuple[str, ...]:
    return tuple(kind.name for kind in kinds())


def by_tier() -> tuple[BackendKind[Any], ...]:
    """Every backend in the order `auto` tries their artifacts, best first."""
    return tuple(sorted(kinds(), key=lambda kind: kind.tier))


def reference() -> BackendKind[Any]:
    """The backend that serves the FP32 ONNX itself: the last artifact of every chain."""
    return next(kind for kind in kinds() if kind.serves_reference)


def get(name: str) -> BackendKind[Any]:
    """The backend called `name`; a KeyError whose sentence lists the choices."""
    for kind in kinds():
        if kind.name == name:
            return kind
    raise KeyError(unknown(name))


def unknown(name: str) -> str:
    """The sentence for a backend name the registry does not hold."""
    return f"{name!r} is not an inference backend; choose one of {', '.join((AUTO, *names()))}"
