"""Built artifacts under `engines/<model>/`: where each lives, its JSON sidecar, and the key that binds it.

`make engine` writes an artifact first and its sidecar last, both atomically; the daemon only loads an
artifact whose sidecar exists, names it, matches its sha256, was built from the ONNX file it serves and
was gated on the hardware and runtime it would run on (the key). So a build that died half-way, or an
engines folder copied from another box, leaves nothing the daemon would load.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.files.durable import write_atomic

# 2: CPU artifacts keyed to the CPU class and ONNX Runtime version, the recipe and the load-time self-check.
SIDECAR_FORMAT = 2
TIMING_CACHE = "timing-cache"  # engines/<plan stem>.timing-cache: per GPU, shared by all models

Precision = Literal["int8", "fp16", "fp32"]


class ArtifactKey(BaseModel):
    """What an artifact was built and gated for and from; it is served only where all of it matches.

    CPU fields are empty for TensorRT plans and GPU fields for ONNX Runtime artifacts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field(description="The backend that serves it, by its registry name.")
    precision: Precision
    onnx_sha256: str
    calibration_sha256: str = ""
    cpu_class: str = Field("", description="The int8 kernel class the gate ran on (cpu_class.detect()).")
    onnxruntime_version: str = ""
    gpu_name: str = ""
    compute_capability: str = ""
    sm_count: int = Field(0, description="Multiprocessors: MIG slices and partitioned GPUs share a name, not this.")
    tensorrt_version: str = ""


class SelfCheck(BaseModel):
    """A few of the gate's own inputs and the artifact's scores on them, rerun at every load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="NumPy .npz beside the sidecar: `inputs` (N x sample) and `scores` (N x labels).")
    sha256: str
    count: int
    tolerance: float = Field(gt=0, le=0.05, description="Largest |score difference| accepted at load.")


class Sidecar(BaseModel):
    """The JSON beside an artifact: its key, how it was built and the accuracy gate's figures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = SIDECAR_FORMAT
    model: str
    model_version: str
    key: ArtifactKey
    artifact: str = Field(description="File name in the same folder; empty when the FP32 ONNX itself is served.")
    artifact_sha256: str = ""
    inputs_sha256: str = Field(description="Hash of everything the build used; equal hashes mean nothing changed.")
    max_batch: int
    opt_batch: int = 0
    excluded_nodes: list[str] = Field(default_factory=list)
    recipe: dict[str, Any] = Field(default_factory=dict, description="How it was quantized, and for which CPU class.")
    self_check: SelfCheck | None = None
    built_unix: float
    build_seconds: float
    gate: dict[str, Any] = Field(default_factory=dict)
    throughput: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


class SidecarError(Exception):
    """A sidecar that is missing, unreadable or of another format."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def engines_folder(engines_dir: Path, model_name: str) -> Path:
    return engines_dir / model_name


def artifact_problem(path: Path, sidecar: Sidecar) -> str:
    """'' when the artifact its sidecar names is there, whole and unaltered, else why not and what to run."""
    if not path.is_file():
        return f"{path} named by its sidecar is missing; run `make engine` to rebuild it"
    if sha256_file(path) != sidecar.artifact_sha256:
        return f"{path} does not match its sidecar (truncated or altered); run `make engine` to rebuild it"
    return ""


def slug(text: str) -> str:
    """A file-name-safe form of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def write_sidecar(path: Path, sidecar: Sidecar) -> None:
    write_atomic(path, (json.dumps(sidecar.model_dump(), indent=2, sort_keys=True) + "\n").encode())


def read_sidecar(path: Path) -> Sidecar:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SidecarError(f"{path} does not exist") from e
    except (OSError, ValueError) as e:
        raise SidecarError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != SIDECAR_FORMAT:
        raise SidecarError(f"{path} is not a sidecar of format {SIDECAR_FORMAT}")
    try:
        return Sidecar.model_validate(raw)
    except ValidationError as e:
        raise SidecarError(f"{path} is malformed: {e.errors()[0]['msg']}") from e
