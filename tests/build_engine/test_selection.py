"""Which artifact the daemon serves, from real build outputs: the best valid one, else FP32 with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.config import InferenceConfig
from appliance.errors import BackendUnavailable
from appliance.inference.artifacts import ORT_RECORD, ArtifactKey, Sidecar, sha256_file, tensorrt_stem, write_sidecar
from appliance.inference.selection import Host, choose_artifact, tensorrt_choice
from appliance.manifest import load_manifest

AUTO = InferenceConfig(backend="auto")


@pytest.fixture
def engines(int8_engines: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "engines"
    shutil.copytree(int8_engines, copy)
    return copy


def test_the_gated_int8_model_is_chosen_with_the_reason(pipeline_model: Path, engines: Path) -> None:
    choice = choose_artifact(load_manifest(pipeline_model), AUTO, engines)
    assert choice.backend == "onnxruntime" and choice.precision == "int8"
    assert choice.path == engines / "pipeline-test" / "onnxruntime-int8.onnx"
    assert "TensorRT is not installed" in choice.reason or "no CUDA GPU" in choice.reason
    assert "passed the accuracy gate" in choice.reason


def test_a_truncated_artifact_is_passed_over_for_fp32(pipeline_model: Path, engines: Path) -> None:
    artifact = engines / "pipeline-test" / "onnxruntime-int8.onnx"
    artifact.write_bytes(artifact.read_bytes()[:1000])
    choice = choose_artifact(load_manifest(pipeline_model), AUTO, engines)
    assert choice.precision == "fp32" and choice.path == pipeline_model / "model.onnx"
    assert "does not match its sidecar (truncated or altered); run `make engine`" in choice.reason


def test_an_artifact_built_from_another_onnx_is_passed_over(
    pipeline_model: Path, engines: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(pipeline_model, model)
    with (model / "model.onnx").open("ab") as f:
        f.write(b"\0")  # another file, same graph as far as a loader cares
    choice = choose_artifact(load_manifest(model), AUTO, engines)
    assert choice.precision == "fp32" and "built from another version of model.onnx" in choice.reason


def test_without_engines_the_fp32_onnx_is_served(pipeline_model: Path, tmp_path: Path) -> None:
    choice = choose_artifact(load_manifest(pipeline_model), AUTO, tmp_path / "none")
    assert choice.precision == "fp32" and "`make engine` builds one" in choice.reason


@pytest.mark.skipif(Host.probe().gpu_name != "", reason="a GPU with TensorRT is present")
def test_backend_tensorrt_on_a_host_without_it_refuses_to_start(pipeline_model: Path, engines: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed|no CUDA GPU"):
        choose_artifact(load_manifest(pipeline_model), InferenceConfig(backend="tensorrt"), engines)


def _plan_for(folder: Path, gpu: str, cc: str, trt: str, onnx_sha: str, data: bytes = b"plan") -> Path:
    stem = tensorrt_stem(gpu, cc)
    plan = folder / f"{stem}.plan"
    plan.write_bytes(data)
    key = ArtifactKey(backend="tensorrt", precision="int8", onnx_sha256=onnx_sha, gpu_name=gpu,
                      compute_capability=cc, tensorrt_version=trt)  # fmt: skip
    sidecar = Sidecar(model="pipeline-test", model_version="1", key=key, artifact=plan.name,
                      artifact_sha256=sha256_file(plan), inputs_sha256="x", max_batch=8, built_unix=0,
                      build_seconds=1)  # fmt: skip
    write_sidecar(folder / f"{stem}.json", sidecar)
    return plan


# The key check itself, against a described host (a value, not a mock): which plan matches which box.
H100 = Host(tensorrt_version="10.16.1.11", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def test_a_plan_for_this_gpu_and_tensorrt_is_chosen(tmp_path: Path) -> None:
    plan = _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64)
    choice, why = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is not None and choice.path == plan and choice.backend == "tensorrt" and why == ""


def test_a_plan_for_another_gpu_is_refused_with_make_engine(tmp_path: Path) -> None:
    _plan_for(tmp_path, "NVIDIA A100-SXM4-40GB", "8.0", "10.16.1.11", "s" * 64)
    choice, why = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is None
    assert "built for NVIDIA A100-SXM4-40GB (compute 8.0), not this NVIDIA H100 80GB HBM3" in why
    assert "run `make engine`" in why


def test_a_plan_from_another_tensorrt_version_is_refused(tmp_path: Path) -> None:
    _plan_for(tmp_path, H100.gpu_name, "9.0", "10.8.0.43", "s" * 64)
    choice, why = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is None and "built with TensorRT 10.8.0.43, this host has 10.16.1.11" in why


def test_a_truncated_plan_is_refused(tmp_path: Path) -> None:
    plan = _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64, data=b"x" * 4096)
    plan.write_bytes(b"x" * 100)
    choice, why = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is None and "truncated or altered" in why


def test_a_sidecar_that_is_not_json_is_refused(tmp_path: Path) -> None:
    _plan_for(tmp_path, H100.gpu_name, "9.0", "10.16.1.11", "s" * 64)
    (tmp_path / f"{tensorrt_stem(H100.gpu_name, '9.0')}.json").write_text("{")
    choice, why = tensorrt_choice(tmp_path, "s" * 64, H100)
    assert choice is None and "not readable JSON" in why


def test_the_ort_record_for_fp32_tells_why(pipeline_model: Path, engines: Path) -> None:
    record = engines / "pipeline-test" / ORT_RECORD
    raw = json.loads(record.read_text())
    raw["artifact"], raw["key"]["precision"] = "", "fp32"
    record.write_text(json.dumps(raw))
    choice = choose_artifact(load_manifest(pipeline_model), AUTO, engines)
    assert choice.precision == "fp32" and "no quantized model within the manifest's tolerance" in choice.reason
