"""The load-time self-check on real artifacts: an intact one is served, one whose outputs moved is refused
and the next in the chain served, with the reason."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.config import InferenceConfig
from appliance.domain.manifest import load_manifest
from appliance.inference import cpu_class
from appliance.inference.artifacts import read_sidecar, sha256_file
from appliance.inference.backends.onnxruntime import onnxruntime_stem
from appliance.inference.loader import open_served

from ..tampering import alter_weights
from .conftest import INT8, build

RECORD = f"{onnxruntime_stem(cpu_class.detect())}.json"


@pytest.fixture
def engines(int8_engines: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "engines"
    shutil.copytree(int8_engines, copy)
    return copy


def test_an_intact_artifact_passes_its_self_check_and_is_served(
    pipeline_model: Path, engines: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    served = open_served(load_manifest(pipeline_model), InferenceConfig(), engines)
    with served.backend:
        assert served.precision == "int8" and served.refused == 0
    assert "passed its self-check on 4 of its gate's images" in caplog.text


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_an_artifact_whose_outputs_moved_is_refused_for_the_next_in_the_chain(
    pipeline_model: Path, engines: Path, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    alter_weights(engines / "pipeline-test" / RECORD)
    served = open_served(load_manifest(pipeline_model), InferenceConfig(backend=backend), engines)
    with served.backend:
        assert served.precision == "fp32" and served.backend.artifact == str(pipeline_model / "model.onnx")
    assert served.refused == 1
    (reason,) = [p for p in served.passed_over if "self-check" in p]
    assert "failed its self-check: on" in reason and "run `make engine`" in reason
    assert "failed at load: The artifact" in served.reason  # GetStatus' served_because says why FP32
    assert "failed its self-check" in caplog.text  # the same sentence in the log


def test_a_self_check_file_that_does_not_match_its_sidecar_is_refused(pipeline_model: Path, engines: Path) -> None:
    folder = engines / "pipeline-test"
    check = read_sidecar(folder / RECORD).self_check
    assert check is not None
    with np.load(folder / check.file) as data:
        inputs, scores = data["inputs"], data["scores"]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=inputs, scores=scores + 0.5)  # expectations forged to match altered weights
    (folder / check.file).write_bytes(buffer.getvalue())
    served = open_served(load_manifest(pipeline_model), InferenceConfig(), engines)
    with served.backend:
        assert served.precision == "fp32"
    assert any("self-check file" in p and "does not match its sidecar" in p for p in served.passed_over)


def test_the_same_artifact_reproduces_its_scores_with_any_thread_count(pipeline_model: Path, engines: Path) -> None:
    """The tolerance is tight because the same kernels give the same scores, however the work is split."""
    for threads in (1, 2):
        served = open_served(load_manifest(pipeline_model), InferenceConfig(threads=threads), engines)
        with served.backend:
            assert served.precision == "int8" and served.refused == 0


def test_an_artifact_that_fails_to_load_is_passed_over_for_the_next(pipeline_model: Path, engines: Path) -> None:
    """As a TensorRT plan that no longer deserializes (a driver or library change under the same version)
    falls back to the CPU model in `auto` instead of stopping the start."""
    record = engines / "pipeline-test" / RECORD
    raw = json.loads(record.read_text())
    artifact = record.parent / raw["artifact"]
    artifact.write_bytes(b"not an ONNX model at all")
    raw["artifact_sha256"] = sha256_file(artifact)
    record.write_text(json.dumps(raw))
    served = open_served(load_manifest(pipeline_model), InferenceConfig(), engines)
    with served.backend:
        assert served.precision == "fp32" and served.refused == 1
    assert any("ONNX Runtime could not load" in p for p in served.passed_over)


def test_an_artifact_without_a_self_check_is_refused(pipeline_model: Path, engines: Path) -> None:
    record = engines / "pipeline-test" / RECORD
    raw = json.loads(record.read_text())
    raw["self_check"] = None  # nulled, as by someone who also rewrote the artifact's hash
    record.write_text(json.dumps(raw))
    served = open_served(load_manifest(pipeline_model), InferenceConfig(), engines)
    with served.backend:
        assert served.precision == "fp32" and served.refused == 1
    assert "has no self-check in its sidecar" in served.reason  # why FP32, in GetStatus' served_because


@pytest.mark.slow  # a build of its own
def test_make_engine_rebuilds_what_the_daemon_would_refuse(pipeline_model: Path, engines: Path) -> None:
    """`make engine` must not call up to date an artifact whose self-check fails: that would leave the
    daemon on FP32 with no way out but --force."""
    check = read_sidecar(engines / "pipeline-test" / RECORD).self_check
    assert check is not None
    (engines / "pipeline-test" / check.file).unlink()
    r = build("--model", pipeline_model, "--engines", engines, *INT8)
    assert r.returncode == 0, r.stderr
    assert "rebuilding: The self-check file" in r.stdout and "up to date" not in r.stdout
    served = open_served(load_manifest(pipeline_model), InferenceConfig(), engines)
    with served.backend:
        assert served.precision == "int8"
