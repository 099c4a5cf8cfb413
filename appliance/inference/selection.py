"""Which artifacts the daemon may serve, best first: each backend's best artifact for this host, in the
registry's tier order (a TensorRT plan built for this GPU, then the quantized CPU model gated on this CPU
class and ONNX Runtime version), then the FP32 ONNX.

Every artifact passed over gets one sentence that says what to run. An explicit backend refuses to start
instead of falling back where its own file says so (`PassedOver.refuses_start`): `tensorrt` without a
usable plan, `onnxruntime` with only CPU artifacts gated on another CPU class or runtime. The loader tries
the chain in order and moves on when a load or its self-check fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import InferenceConfig
from appliance.domain.errors import BackendUnavailable, ModelMismatchError
from appliance.domain.manifest import LoadedManifest
from appliance.inference import cpu_class, registry
from appliance.inference.artifacts import engines_folder, sha256_file
from appliance.inference.backend import Choice, PassedOver, Why
from appliance.inference.backends import cuda
from appliance.inference.backends.onnxruntime import runtime_version
from appliance.inference.backends.tensorrt import gpu_problem, tensorrt_version


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

    @staticmethod
    def probe(device: int = 0) -> Host:
        version = tensorrt_version()
        if not version:
            return Host(version, "", "", device=device)
        problem = gpu_problem(device)
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
    named = inference.backend != registry.AUTO
    kinds = [registry.get(inference.backend)] if named else registry.by_tier()
    for kind in kinds:
        choice, passed = kind.choose(folder, onnx_sha, host, loaded.onnx_path)
        if choice is not None:
            selection.chain.append(choice)
        elif named and passed.refuses_start:
            sentence = passed.reason[0].upper() + passed.reason[1:] + "."
            raise BackendUnavailable(sentence) if passed.why is Why.NO_RUNTIME else ModelMismatchError(sentence)
        else:
            selection.passed_over.append(passed)
    reference = registry.reference()
    if named and kinds[0] is not reference:
        return selection  # the one backend named has its artifact, and nothing else may stand in for it
    if not selection.chain or selection.chain[-1].path != loaded.onnx_path:
        why = "no artifact before it may be served here" if selection.passed_over else "the FP32 model, the reference"
        selection.chain.append(Choice(reference.name, loaded.onnx_path, "fp32", why))
    return selection
