"""Which artifacts the daemon may serve, best first: a TensorRT plan built for this GPU, the quantized CPU
model gated on this CPU class and ONNX Runtime version, then the FP32 ONNX.

Every artifact passed over gets one sentence that says what to run. An explicit backend refuses to start
instead of falling back: `tensorrt` without a usable plan, `onnxruntime` with only CPU artifacts gated on
another CPU class or runtime. The loader tries the chain in order and moves on when a load or its
self-check fails.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from appliance.config import InferenceConfig
from appliance.errors import BackendUnavailable, ModelMismatchError
from appliance.inference import cpu_class, cuda
from appliance.inference.artifacts import (
    ArtifactKey,
    Sidecar,
    SidecarError,
    engines_folder,
    onnxruntime_stem,
    read_sidecar,
    sha256_file,
    tensorrt_stem,
)
from appliance.inference.onnxruntime import runtime_version
from appliance.inference.tensorrt import tensorrt_version
from appliance.manifest import LoadedManifest

LEGACY_ORT_RECORD = "onnxruntime.json"  # sidecar format 1: no CPU class or runtime in its key


class Why(enum.Enum):
    """Why an artifact was passed over; decides whether an explicit backend may start without it."""

    NO_RUNTIME = "no_runtime"  # TensorRT or a GPU is missing on this host
    NONE_BUILT = "none_built"  # nothing in the engines folder for this backend
    OTHER_HOST = "other_host"  # built and gated for another GPU, CPU class or runtime version
    STALE = "stale"  # built from another ONNX file
    DAMAGED = "damaged"  # sidecar or artifact unreadable, missing, truncated or altered


@dataclass(frozen=True)
class PassedOver:
    why: Why
    reason: str
    tier: int = 0  # 0: a TensorRT plan, 1: a quantized CPU model (an FP32 ONNX is tier 2 and never passed over)
    # With `backend = "onnxruntime"`: a CPU model that names a quantized artifact it may not serve here
    # refuses the start; a record that only says FP32 is served does not (FP32 needs no gating).
    blocks_onnxruntime: bool = False


@dataclass(frozen=True)
class Choice:
    backend: Literal["onnxruntime", "tensorrt"]
    path: Path
    precision: str
    reason: str
    sidecar: Sidecar | None = None
    tier: int = 2  # as PassedOver.tier


@dataclass
class Selection:
    chain: list[Choice]  # best first; the last one is served if all before it fail to load
    passed_over: list[PassedOver] = field(default_factory=list)


@dataclass(frozen=True)
class Host:
    """What artifact keys are checked against."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    sm_count: int = 0
    gpu_problem: str = ""
    device: int = 0
    cpu_class: str = field(default_factory=cpu_class.detect)
    onnxruntime_version: str = field(default_factory=runtime_version)

    @property
    def tensorrt_problem(self) -> str:
        """Why this host cannot run TensorRT plans; '' if it can."""
        if not self.tensorrt_version:
            return "TensorRT is not installed on this host"
        if not self.gpu_name:
            return self.gpu_problem or "no CUDA GPU is visible on this host"
        return ""

    @staticmethod
    def probe(device: int = 0) -> Host:
        version = tensorrt_version()
        if not version:
            return Host(version, "", "", device=device)
        problem = cuda.gpu_problem().rstrip(".")
        if not problem and device >= cuda.gpu_count():
            problem = f"CUDA device {device} does not exist (this host has {cuda.gpu_count()}; see inference.device)"
        if problem:
            return Host(version, "", "", gpu_problem=problem, device=device)
        gpu = cuda.gpu_info(device)
        return Host(version, gpu.name, gpu.compute_capability, gpu.sm_count, device=device)


def choose_artifact(
    loaded: LoadedManifest, inference: InferenceConfig, engines_dir: Path, host: Host | None = None
) -> Selection:
    host = host or Host.probe(inference.device)
    folder = engines_folder(engines_dir, loaded.manifest.model.name)
    onnx_sha = sha256_file(loaded.onnx_path)
    selection = Selection(chain=[])
    if inference.backend in ("auto", "tensorrt"):
        plan, passed = tensorrt_choice(folder, onnx_sha, host)
        if plan is not None:
            selection.chain.append(plan)
        elif inference.backend == "tensorrt":
            sentence = passed.reason[0].upper() + passed.reason[1:] + "."
            raise BackendUnavailable(sentence) if passed.why is Why.NO_RUNTIME else ModelMismatchError(sentence)
        else:
            selection.passed_over.append(passed)
        if inference.backend == "tensorrt":
            return selection
    cpu, passed = onnxruntime_choice(folder, onnx_sha, loaded.onnx_path, host)
    if cpu is not None:
        selection.chain.append(cpu)
    elif inference.backend == "onnxruntime" and passed.blocks_onnxruntime:
        raise ModelMismatchError(passed.reason[0].upper() + passed.reason[1:] + ".")
    else:
        selection.passed_over.append(passed)
    if not selection.chain or selection.chain[-1].path != loaded.onnx_path:
        why = "no artifact before it may be served here" if selection.passed_over else "the FP32 model, the reference"
        selection.chain.append(Choice("onnxruntime", loaded.onnx_path, "fp32", why))
    return selection


def tensorrt_choice(folder: Path, onnx_sha: str, host: Host) -> tuple[Choice | None, PassedOver]:
    if host.tensorrt_problem:
        return None, PassedOver(Why.NO_RUNTIME, host.tensorrt_problem)
    sidecars = sorted(folder.glob("tensorrt-*.json"))
    if not sidecars:
        return None, PassedOver(Why.NONE_BUILT, f"no TensorRT plan in {folder}; run `make engine` to build one")
    mine = folder / f"{tensorrt_stem(host.gpu_name, host.compute_capability, host.sm_count)}.json"
    if mine not in sidecars:
        others = []
        for path in sidecars:
            try:
                key = read_sidecar(path).key
                others.append(f"{key.gpu_name} (compute {key.compute_capability}, {key.sm_count} SMs)")
            except SidecarError:
                others.append(path.name)
        return None, PassedOver(
            Why.OTHER_HOST,
            f"the TensorRT plans in {folder} were built for {', '.join(others)}, not this {host.gpu_name} "
            f"(compute {host.compute_capability}, {host.sm_count} SMs); run `make engine` to build one for this GPU",
        )
    try:
        sidecar = read_sidecar(mine)
    except SidecarError as e:
        return None, PassedOver(Why.DAMAGED, f"{e}; run `make engine` to rebuild the plan")
    key = sidecar.key
    plan = folder / sidecar.artifact
    if key.tensorrt_version != host.tensorrt_version:
        return None, PassedOver(
            Why.OTHER_HOST,
            f"{plan.name} was built with TensorRT {key.tensorrt_version}, this host has "
            f"{host.tensorrt_version}; run `make engine` to rebuild it",
        )
    if key.sm_count != host.sm_count:
        return None, PassedOver(
            Why.OTHER_HOST,
            f"{plan.name} was built for a {key.gpu_name} with {key.sm_count} multiprocessors, this one has "
            f"{host.sm_count} (another module of the same name, a MIG slice or a partition); run `make engine` to "
            "build one for it",
        )
    if key.onnx_sha256 != onnx_sha:
        return None, PassedOver(
            Why.STALE, f"{plan.name} was built from another version of the model's ONNX file; run `make engine`"
        )
    problem = _artifact_problem(plan, sidecar)
    if problem:
        return None, PassedOver(Why.DAMAGED, problem)
    reason = f"{key.precision} plan built for this {host.gpu_name}"
    return Choice("tensorrt", plan, key.precision, reason, sidecar, tier=0), PassedOver(Why.NONE_BUILT, "")


def onnxruntime_choice(folder: Path, onnx_sha: str, onnx_path: Path, host: Host) -> tuple[Choice | None, PassedOver]:
    record = folder / f"{onnxruntime_stem(host.cpu_class)}.json"
    here = f"this {host.cpu_class} CPU with ONNX Runtime {host.onnxruntime_version}"
    if not record.exists():
        others = sorted(folder.glob("onnxruntime-*.json"))
        gated_on = [_gated_on(path) for path in others]
        legacy = folder / LEGACY_ORT_RECORD
        if legacy.exists():
            others.append(legacy)
            gated_on.append("an unrecorded CPU class (built before CPU models were keyed to it)")
        if others:
            return None, PassedOver(
                Why.OTHER_HOST,
                f"the CPU models in {folder} were gated on {', '.join(gated_on)}, not {here} (int8 kernels differ "
                "between CPU classes); run `make engine` to build one for this CPU",
                tier=1,
                blocks_onnxruntime=any(_names_artifact(path) for path in others),
            )
        return None, PassedOver(Why.NONE_BUILT, f"no quantized CPU model in {folder}; `make engine` builds one", tier=1)
    try:
        sidecar = read_sidecar(record)
    except SidecarError as e:
        return None, PassedOver(Why.DAMAGED, f"{e}; run `make engine` to rebuild it", tier=1)
    key = sidecar.key
    if key.cpu_class != host.cpu_class or key.onnxruntime_version != host.onnxruntime_version:
        return None, PassedOver(
            Why.OTHER_HOST,
            f"the CPU model in {folder} was gated on {_cpu_of(key)}, not {here}; run `make engine` to rebuild it",
            tier=1,
            blocks_onnxruntime=bool(sidecar.artifact),
        )
    if key.onnx_sha256 != onnx_sha:
        return None, PassedOver(
            Why.STALE,
            f"the CPU model in {folder} was built from another version of {onnx_path.name}; run `make engine`",
            tier=1,
        )
    if not sidecar.artifact:
        reason = "`make engine` found no quantized model within the manifest's tolerance, so FP32 is served"
        return Choice("onnxruntime", onnx_path, "fp32", reason, sidecar), PassedOver(Why.NONE_BUILT, "")
    path = folder / sidecar.artifact
    problem = _artifact_problem(path, sidecar)
    if problem:
        return None, PassedOver(Why.DAMAGED, problem, tier=1)
    reason = f"{key.precision} CPU model that passed the accuracy gate on {here}"
    return Choice("onnxruntime", path, key.precision, reason, sidecar, tier=1), PassedOver(Why.NONE_BUILT, "")


def _names_artifact(record: Path) -> bool:
    """Whether a CPU record, of any format, names a quantized artifact (unreadable: assume it does)."""
    try:
        return bool(json.loads(record.read_text(encoding="utf-8")).get("artifact", True))
    except (OSError, ValueError, AttributeError):
        return True


def _gated_on(record: Path) -> str:
    try:
        return _cpu_of(read_sidecar(record).key)
    except SidecarError:
        return f"{record.name} (unreadable)"


def _cpu_of(key: ArtifactKey) -> str:
    return f"{key.cpu_class or 'an unknown'} CPU with ONNX Runtime {key.onnxruntime_version or 'unknown'}"


def _artifact_problem(path: Path, sidecar: Sidecar) -> str:
    if not path.is_file():
        return f"{path} named by its sidecar is missing; run `make engine` to rebuild it"
    if sha256_file(path) != sidecar.artifact_sha256:
        return f"{path} does not match its sidecar (truncated or altered); run `make engine` to rebuild it"
    return ""
