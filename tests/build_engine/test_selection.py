"""Which artifact the daemon serves, from real build outputs: the best valid one, else FP32 with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.config import InferenceConfig
from appliance.domain.errors import BackendUnavailable, ModelMismatchError
from appliance.domain.manifest import load_manifest
from appliance.inference import cpu_class
from appliance.inference.artifacts import (
    ArtifactKey,
    Sidecar,
    sha256_file,
    write_sidecar,
)
from appliance.inference.backend import Why
from appliance.inference.backends import tensorrt
from appliance.inference.backends.onnxruntime import onnxruntime_stem, runtime_version
from appliance.inference.backends.tensorrt import TensorRtHost, tensorrt_choice, tensorrt_stem
from appliance.inference.selection import Host, choose_artifact

AUTO = InferenceConfig(backend="auto")
ORT = InferenceConfig(backend="onnxruntime")
HERE = onnxruntime_stem(cpu_class.detect())
# The other x86 class: a saturating one where this host has VNNI, and the reverse.
OTHER = "avx2" if cpu_class.detect() not in cpu_class.SATURATING else "avx512-vnni"


@pytest.fixture
def engines(int8_engines: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "engines"
    shutil.copytree(int8_engines, copy)
    return copy


def _served(model: Path, engines: Path, config: InferenceConfig = AUTO) -> tuple[str, Path, str]:
    """What the daemon would serve first: precision, path and the sentences of everything passed over."""
    selection = choose_artifact(load_manifest(model), config, engines)
    first = selection.chain[0]
    return first.precision, first.path, "; ".join([first.reason, *(p.reason for p in selection.passed_over)])


def test_the_gated_int8_model_is_chosen_with_the_reason(pipeline_model: Path, engines: Path) -> None:
    selection = choose_artifact(load_manifest(pipeline_model), AUTO, engines)
    choice = selection.chain[0]
    assert choice.backend == "onnxruntime" and choice.precision == "int8"
    assert choice.path == engines / "pipeline-test" / f"{HERE}-int8.onnx"
    assert "passed the accuracy gate on this" in choice.reason and cpu_class.detect() in choice.reason
    assert [p.why for p in selection.passed_over] == [Why.NO_RUNTIME]  # TensorRT, on this machine
    # The FP32 ONNX is always last in the chain, for an artifact that fails to load or its self-check.
    assert selection.chain[-1].path == pipeline_model / "model.onnx"


def test_a_truncated_artifact_is_passed_over_for_fp32(pipeline_model: Path, engines: Path) -> None:
    artifact = engines / "pipeline-test" / f"{HERE}-int8.onnx"
    artifact.write_bytes(artifact.read_bytes()[:1000])
    precision, path, why = _served(pipeline_model, engines)
    assert precision == "fp32" and path == pipeline_model / "model.onnx"
    assert "does not match its sidecar (truncated or altered); run `make engine`" in why


def test_an_artifact_built_from_another_onnx_is_passed_over(
    pipeline_model: Path, engines: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(pipeline_model, model)
    with (model / "model.onnx").open("ab") as f:
        f.write(b"\0")  # another file, same graph as far as a loader cares
    precision, _, why = _served(model, engines)
    assert precision == "fp32" and "built from another version of model.onnx" in why


def test_without_engines_the_fp32_onnx_is_served(pipeline_model: Path, tmp_path: Path) -> None:
    precision, _, why = _served(pipeline_model, tmp_path / "none")
    assert precision == "fp32" and "`make engine` builds one" in why


def _move_to_class(engines: Path, gated_on: str, runtime: str | None = None) -> None:
    """The engines folder as copied from a box of another CPU class: its key and file names say so."""
    folder = engines / "pipeline-test"
    record = folder / f"{HERE}.json"
    raw = json.loads(record.read_text())
    raw["key"]["cpu_class"] = gated_on
    raw["key"]["onnxruntime_version"] = runtime or raw["key"]["onnxruntime_version"]
    stem = onnxruntime_stem(gated_on)
    record.unlink()
    (folder / f"{stem}.json").write_text(json.dumps(raw))


def test_an_artifact_gated_on_another_cpu_class_is_passed_over_with_make_engine(
    pipeline_model: Path, engines: Path
) -> None:
    _move_to_class(engines, OTHER)
    precision, path, why = _served(pipeline_model, engines)
    assert precision == "fp32" and path == pipeline_model / "model.onnx"
    assert f"were gated on {OTHER} CPU with ONNX Runtime {runtime_version()}, not this {cpu_class.detect()} CPU" in why
    assert "int8 kernels differ between CPU classes); run `make engine` to build one for this CPU" in why


def test_backend_onnxruntime_with_only_another_class_s_artifact_refuses_to_start(
    pipeline_model: Path, engines: Path
) -> None:
    _move_to_class(engines, OTHER)
    with pytest.raises(ModelMismatchError, match=rf"gated on {OTHER} CPU .* run `make engine`"):
        choose_artifact(load_manifest(pipeline_model), ORT, engines)


def test_backend_onnxruntime_starts_on_fp32_when_the_other_record_serves_fp32_only(
    pipeline_model: Path, engines: Path
) -> None:
    """FP32 needs no gating: a record from another class or runtime that only says `FP32 is served` is no
    reason to refuse the start."""
    record = engines / "pipeline-test" / f"{HERE}.json"
    raw = json.loads(record.read_text())
    raw["artifact"], raw["key"]["precision"], raw["key"]["onnxruntime_version"] = "", "fp32", "1.17.0"
    record.write_text(json.dumps(raw))
    selection = choose_artifact(load_manifest(pipeline_model), ORT, engines)
    assert [c.precision for c in selection.chain] == ["fp32"]
    assert any("ONNX Runtime 1.17.0" in p.reason for p in selection.passed_over)


def test_an_artifact_gated_on_another_onnx_runtime_is_passed_over(pipeline_model: Path, engines: Path) -> None:
    record = engines / "pipeline-test" / f"{HERE}.json"
    raw = json.loads(record.read_text())
    raw["key"]["onnxruntime_version"] = "1.17.0"
    record.write_text(json.dumps(raw))
    precision, _, why = _served(pipeline_model, engines)
    assert precision == "fp32"
    assert f"gated on {cpu_class.detect()} CPU with ONNX Runtime 1.17.0, not this" in why and "make engine" in why
    with pytest.raises(ModelMismatchError, match=r"ONNX Runtime 1\.17\.0"):
        choose_artifact(load_manifest(pipeline_model), ORT, engines)


def test_a_cpu_model_from_before_cpu_keys_is_passed_over(pipeline_model: Path, engines: Path) -> None:
    folder = engines / "pipeline-test"
    (folder / f"{HERE}.json").rename(folder / "onnxruntime.json")  # as 0.1.0 named it, keyed to no CPU
    precision, _, why = _served(pipeline_model, engines)
    assert precision == "fp32" and "an unrecorded CPU class" in why and "make engine" in why


@pytest.mark.skipif(Host.probe().of(tensorrt.KIND).gpu_name != "", reason="a GPU with TensorRT is present")
def test_backend_tensorrt_on_a_host_without_it_refuses_to_start(pipeline_model: Path, engines: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed|no CUDA GPU"):
        choose_artifact(load_manifest(pipeline_model), InferenceConfig(backend="tensorrt"), engines)


def _plan_for(
    folder: Path, gpu: str, cc: str, trt: str, onnx_sha: str, data: bytes = b"plan", sm_count: int = 132
) -> Path:
    stem = tensorrt_stem(gpu, cc, sm_count)
    plan = folder / f"{stem}.plan"
    plan.write_bytes(data)
    key = ArtifactKey(backend="tensorrt", precision="int8", onnx_sha256=onnx_sha, gpu_name=gpu,
                      compute_capability=cc, tensorrt_version=trt, sm_count=sm_count)  # fmt: skip
    sidecar = Sidecar(model="pipeline-test", model_version="1", key=key, artifact=plan.name,
                      artifact_sha256=sha256_file(plan), inputs_sha256="x", max_batch=8, built_unix=0,
                      build_seconds=1)  # fmt: skip
    write_sidecar(folder / f"{stem}.json", sidecar)
    return plan


# The key check itself, against a described host (a value, not a mock): which plan matches which box.
H100 = TensorRtHost(
    tensorrt_version="10.16.1.11", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", sm_count=132
)


def test_a_plan_for_this_gpu_and_tensorrt_is_chosen(tmp_path: Path) -> None:
    plan = _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64)
    choice, passed = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is not None and choice.path == plan and choice.backend == "tensorrt" and passed.reason == ""


def test_a_plan_for_another_gpu_is_refused_with_make_engine(tmp_path: Path) -> None:
    _plan_for(tmp_path, "NVIDIA A100-SXM4-40GB", "8.0", "10.16.1.11", "s" * 64, sm_count=108)
    choice, passed = tensorrt_choice(tmp_path, "s" * 64, H100)
    why = passed.reason
    assert choice is None
    assert "built for NVIDIA A100-SXM4-40GB (compute 8.0, 108 SMs), not this NVIDIA H100 80GB HBM3" in why
    assert "run `make engine`" in why


def test_a_plan_from_another_tensorrt_version_is_refused(tmp_path: Path) -> None:
    _plan_for(tmp_path, H100.gpu_name, "9.0", "10.8.0.43", "s" * 64)
    choice, passed = tensorrt_choice(tmp_path, "s" * 64, H100)
    why = passed.reason
    assert choice is None and "built with TensorRT 10.8.0.43, this host has 10.16.1.11" in why


def test_a_plan_for_another_module_or_slice_of_the_same_name_is_refused(tmp_path: Path) -> None:
    """Jetson Orin modules and MIG slices share a name and compute capability; the SM count tells them apart,
    in the key and in the file name, so boxes of each can share a folder."""
    _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64, sm_count=66)  # a MIG 3g slice, say
    choice, passed = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is None and passed.why is Why.OTHER_HOST
    assert "(compute 9.0, 66 SMs), not this NVIDIA H100 80GB HBM3 (compute 9.0, 132 SMs)" in passed.reason
    mine = _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64)  # now one for this one too
    choice, _ = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is not None and choice.path == mine


def test_a_truncated_plan_is_refused(tmp_path: Path) -> None:
    plan = _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64, data=b"x" * 4096)
    plan.write_bytes(b"x" * 100)
    choice, passed = tensorrt_choice(tmp_path, "s" * 64, H100)
    why = passed.reason
    assert choice is None and "truncated or altered" in why


def test_a_sidecar_that_is_not_json_is_refused(tmp_path: Path) -> None:
    _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64)
    (tmp_path / f"{tensorrt_stem(H100.gpu_name, '9.0', 132)}.json").write_text("{")
    choice, passed = tensorrt_choice(tmp_path, "s" * 64, H100)
    why = passed.reason
    assert choice is None and "not readable JSON" in why


def test_the_ort_record_for_fp32_tells_why(pipeline_model: Path, engines: Path) -> None:
    record = engines / "pipeline-test" / f"{HERE}.json"
    raw = json.loads(record.read_text())
    raw["artifact"], raw["key"]["precision"] = "", "fp32"
    record.write_text(json.dumps(raw))
    precision, _, why = _served(pipeline_model, engines)
    assert precision == "fp32" and "no quantized model within the manifest's tolerance" in why
