"""Sidecars and atomic writes: what the daemon trusts before it loads an artifact."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.files.durable import write_atomic
from appliance.inference.artifacts import (
    ArtifactKey,
    Sidecar,
    SidecarError,
    read_sidecar,
    write_sidecar,
)
from appliance.inference.backends.tensorrt import tensorrt_stem


def _sidecar() -> Sidecar:
    key = ArtifactKey(
        backend="tensorrt",
        precision="int8",
        onnx_sha256="a" * 64,
        calibration_sha256="b" * 64,
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        sm_count=132,
        tensorrt_version="10.16.1.11",
    )
    return Sidecar(
        model="m",
        model_version="1",
        key=key,
        artifact="tensorrt-nvidia-h100-80gb-hbm3-sm90.plan",
        artifact_sha256="c" * 64,
        inputs_sha256="d" * 64,
        max_batch=8,
        opt_batch=4,
        built_unix=time.time(),
        build_seconds=12.5,
        gate={"agreement": 1.0, "max_abs_diff": 0.01, "mean_abs_diff": 0.001},
    )


def test_sidecar_round_trip_keeps_the_whole_key(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_sidecar(path, _sidecar())
    back = read_sidecar(path)
    assert back == _sidecar().model_copy(update={"built_unix": back.built_unix})
    assert json.loads(path.read_text())["key"]["compute_capability"] == "9.0"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left


def test_plan_names_follow_the_gpu() -> None:
    assert tensorrt_stem("NVIDIA H100 80GB HBM3", "9.0") == "tensorrt-nvidia-h100-80gb-hbm3-sm90"
    assert tensorrt_stem("Orin (nvgpu)", "8.7") == "tensorrt-orin-nvgpu-sm87"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not readable JSON"),
        ('{"format": 99}', "not a sidecar of format 2"),
        ('{"format": 1, "model": "m"}', "not a sidecar of format 2"),  # keyed to no CPU class: rebuilt
        ('{"format": 2, "model": "m"}', "malformed"),
    ],
)
def test_bad_sidecars_are_refused_with_a_reason(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SidecarError, match=message):
        read_sidecar(path)


def test_write_atomic_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.bin"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]
