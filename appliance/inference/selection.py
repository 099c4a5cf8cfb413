"""Which artifact the daemon serves: a TensorRT plan built for this GPU, else the quantized CPU model, else FP32.

Every refusal is one sentence that says what to run, and is logged; with `backend = "tensorrt"` a
refusal stops the start instead of falling back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.config import InferenceConfig
from appliance.errors import BackendUnavailable, ModelMismatchError
from appliance.inference import cuda
from appliance.inference.artifacts import (
    ORT_RECORD,
    Sidecar,
    SidecarError,
    engines_folder,
    read_sidecar,
    sha256_file,
    tensorrt_stem,
)
from appliance.inference.tensorrt import tensorrt_version
from appliance.manifest import LoadedManifest


@dataclass(frozen=True)
class Choice:
    backend: Literal["onnxruntime", "tensorrt"]
    path: Path
    precision: str
    reason: str
    sidecar: Sidecar | None = None


@dataclass(frozen=True)
class Host:
    """What the plan key is checked against."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @property
    def tensorrt_problem(self) -> str:
        """Why this host cannot run TensorRT plans; '' if it can."""
        if not self.tensorrt_version:
            return "TensorRT is not installed on this host"
        if not self.gpu_name:
            return "no CUDA GPU is visible on this host"
        return ""

    @staticmethod
    def probe() -> Host:
        version = tensorrt_version()
        if not version or cuda.gpu_count() == 0:
            return Host(version, "", "")
        gpu = cuda.gpu_info(0)
        return Host(version, gpu.name, gpu.compute_capability)


def choose_artifact(loaded: LoadedManifest, inference: InferenceConfig, engines_dir: Path) -> Choice:
    folder = engines_folder(engines_dir, loaded.manifest.model.name)
    onnx_sha = sha256_file(loaded.onnx_path)
    passed_over: list[str] = []
    if inference.backend in ("auto", "tensorrt"):
        plan, why = tensorrt_choice(folder, onnx_sha, Host.probe())
        if plan is not None:
            return plan
        if inference.backend == "tensorrt":
            if "not installed" in why or "no CUDA GPU" in why:
                raise BackendUnavailable(why[0].upper() + why[1:] + ".")
            raise ModelMismatchError(why[0].upper() + why[1:] + ".")
        passed_over.append(why)
    quantized, why = onnxruntime_choice(folder, onnx_sha, loaded.onnx_path)
    if quantized is not None:
        reason = "; ".join([*passed_over, quantized.reason])
        return Choice(quantized.backend, quantized.path, quantized.precision, reason, quantized.sidecar)
    passed_over.append(why)
    return Choice("onnxruntime", loaded.onnx_path, "fp32", "; ".join(passed_over))


def tensorrt_choice(folder: Path, onnx_sha: str, host: Host) -> tuple[Choice | None, str]:
    if host.tensorrt_problem:
        return None, host.tensorrt_problem
    sidecars = sorted(folder.glob("tensorrt-*.json"))
    if not sidecars:
        return None, f"no TensorRT plan in {folder}; run `make engine` to build one"
    mine = folder / f"{tensorrt_stem(host.gpu_name, host.compute_capability)}.json"
    if mine not in sidecars:
        others = []
        for path in sidecars:
            try:
                key = read_sidecar(path).key
                others.append(f"{key.gpu_name} (compute {key.compute_capability})")
            except SidecarError:
                others.append(path.name)
        return None, (
            f"the TensorRT plans in {folder} were built for {', '.join(others)}, not this {host.gpu_name} "
            f"(compute {host.compute_capability}); run `make engine` to build one for this GPU"
        )
    try:
        sidecar = read_sidecar(mine)
    except SidecarError as e:
        return None, f"{e}; run `make engine` to rebuild the plan"
    key = sidecar.key
    plan = folder / sidecar.artifact
    if key.tensorrt_version != host.tensorrt_version:
        return None, (
            f"{plan.name} was built with TensorRT {key.tensorrt_version}, this host has "
            f"{host.tensorrt_version}; run `make engine` to rebuild it"
        )
    if key.onnx_sha256 != onnx_sha:
        return None, f"{plan.name} was built from another version of the model's ONNX file; run `make engine`"
    problem = _artifact_problem(plan, sidecar)
    if problem:
        return None, problem
    return Choice("tensorrt", plan, key.precision, f"{key.precision} plan built for this {host.gpu_name}", sidecar), ""


def onnxruntime_choice(folder: Path, onnx_sha: str, onnx_path: Path) -> tuple[Choice | None, str]:
    record = folder / ORT_RECORD
    if not record.exists():
        return None, f"no quantized CPU model in {folder}; `make engine` builds one"
    try:
        sidecar = read_sidecar(record)
    except SidecarError as e:
        return None, f"{e}; run `make engine` to rebuild it"
    if sidecar.key.onnx_sha256 != onnx_sha:
        return None, f"the CPU model in {folder} was built from another version of {onnx_path.name}; run `make engine`"
    if not sidecar.artifact:
        reason = "`make engine` found no quantized model within the manifest's tolerance, so FP32 is served"
        return Choice("onnxruntime", onnx_path, "fp32", reason, sidecar), ""
    path = folder / sidecar.artifact
    problem = _artifact_problem(path, sidecar)
    if problem:
        return None, problem
    reason = f"{sidecar.key.precision} CPU model that passed the accuracy gate"
    return Choice("onnxruntime", path, sidecar.key.precision, reason, sidecar), ""


def _artifact_problem(path: Path, sidecar: Sidecar) -> str:
    if not path.is_file():
        return f"{path} named by its sidecar is missing; run `make engine` to rebuild it"
    if sha256_file(path) != sidecar.artifact_sha256:
        return f"{path} does not match its sidecar (truncated or altered); run `make engine` to rebuild it"
    return ""
