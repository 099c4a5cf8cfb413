"""Triton Inference Server: the model runs on servers past this host, so nothing is built or gated for it here.
`make engine TARGET=triton REPO=dir` exports what `make engine` gated (build_engine/triton_repo.py); `make engine`
without a target builds nothing for it (its backend is remote)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from appliance.inference.backends import triton as backend
from build_engine.errors import BuildError
from build_engine.quantize import Recipe
from build_engine.target import BuildTarget

if TYPE_CHECKING:
    from build_engine.build import Builder

EXPORTED = (
    "Nothing is built for Triton: `make engine TARGET=triton REPO=dir` exports the artifact `make engine` gated "
    "(python -m build_engine --target triton --repo DIR)."
)


class TritonTarget(BuildTarget):
    name = backend.NAME

    def recipe(self, b: Builder) -> Recipe:
        raise BuildError(EXPORTED)

    def make(self, b: Builder, onnx_path: Path, precision: str, work: Path) -> Path:
        raise BuildError(EXPORTED)


TARGET = TritonTarget()
