"""The inference backends the appliance knows, one file each under `appliance/inference/backends/`.

Adding one: a new file there that ends in `KIND = BackendKind(...)`, and its module's line below. The
loader, the artifact choice, config validation and `make engine` ask this list, never a backend's name.
Modules are imported on first use, so reading a config (the client does) does not load ONNX Runtime.
"""

from __future__ import annotations

import importlib
from functools import cache

from appliance.inference.backend import BackendKind

AUTO = "auto"  # not a backend: `inference.backend = "auto"` serves the best artifact of any of them

# In `make engine`'s build order: the reference first, as every other artifact is gated against it.
MODULES = (
    "appliance.inference.backends.onnxruntime",
    "appliance.inference.backends.tensorrt",
)


@cache
def kinds() -> tuple[BackendKind, ...]:
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


def by_tier() -> tuple[BackendKind, ...]:
    """Every backend in the order `auto` tries their artifacts, best first."""
    return tuple(sorted(kinds(), key=lambda kind: kind.tier))


def reference() -> BackendKind:
    """The backend that serves the FP32 ONNX itself: the last artifact of every chain."""
    return next(kind for kind in kinds() if kind.serves_reference)


def get(name: str) -> BackendKind:
    """The backend called `name`; a KeyError whose sentence lists the choices."""
    for kind in kinds():
        if kind.name == name:
            return kind
    raise KeyError(unknown(name))


def unknown(name: str) -> str:
    """The sentence for a backend name the registry does not hold."""
    return f"{name!r} is not an inference backend; choose one of {', '.join((AUTO, *names()))}"
