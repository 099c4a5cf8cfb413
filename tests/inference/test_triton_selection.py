"""The remote backend's place in the artifact choice and the loader, without a server: `auto` never sends inference
away; `triton` named needs servers and an export of this model, and is served with this host's own chain behind it,
which serves at once where no server answers (a real refused connection), said as a degraded fault."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from appliance.config import InferenceConfig
from appliance.domain.errors import BackendUnavailable, ModelMismatchError
from appliance.domain.faults import Faults
from appliance.domain.manifest import load_manifest
from appliance.inference.artifacts import ArtifactKey, SelfCheck, Sidecar, sha256_file, write_sidecar
from appliance.inference.backends.triton import record_path
from appliance.inference.failover import FAULT, Failover
from appliance.inference.loader import expected_sample_shape, open_served
from appliance.inference.selection import choose_artifact
from tests.peers import free_port

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"


def _export(engines: Path, name: str = "pipeline-test", onnx_sha: str | None = None) -> Path:
    """The record `make engine TARGET=triton` leaves here: its sidecar (the self-check is run on a server only)."""
    folder = engines / "pipeline-test"
    folder.mkdir(parents=True, exist_ok=True)
    record = record_path(folder, name)
    key = ArtifactKey(backend="triton", precision="fp32", onnx_sha256=onnx_sha or sha256_file(MODEL / "model.onnx"))
    check = SelfCheck(file=f"triton-{name}.selfcheck.npz", sha256="0" * 64, count=4, tolerance=2e-3)
    sidecar = Sidecar(
        model="pipeline-test",
        model_version="1",
        key=key,
        artifact="model.onnx",
        inputs_sha256="",
        max_batch=8,
        recipe={"triton_model": name, "triton_version": "1"},
        self_check=check,
        built_unix=time.time(),
        build_seconds=0.0,
    )
    write_sidecar(record, sidecar)
    return record


def _triton(*endpoints: str, **more: object) -> InferenceConfig:
    return InferenceConfig(backend="triton", triton={"endpoints": list(endpoints), **more})


def test_auto_never_sends_inference_to_a_server(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    _export(engines)
    config = InferenceConfig(triton={"endpoints": [f"127.0.0.1:{free_port()}"]})  # backend: auto
    selection = choose_artifact(load_manifest(MODEL), config, engines)
    assert [c.backend for c in selection.chain] == ["onnxruntime"]
    assert all("triton" not in p.reason.lower() for p in selection.passed_over)


def test_named_it_comes_first_with_this_host_s_chain_behind_it(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    record = _export(engines)
    selection = choose_artifact(load_manifest(MODEL), _triton("127.0.0.1:8001"), engines)
    assert [(c.backend, c.precision) for c in selection.chain] == [("triton", "fp32"), ("onnxruntime", "fp32")]
    assert selection.chain[0].path == record and "127.0.0.1:8001" in selection.chain[0].reason


@pytest.mark.parametrize(
    ("endpoints", "export", "error", "needle"),
    [
        ((), True, BackendUnavailable, "No inference server is configured (inference.triton.endpoints)."),
        (("127.0.0.1:8001",), False, ModelMismatchError, "No Triton export of this model in"),
        (("127.0.0.1:8001",), "stale", ModelMismatchError, "was exported from another version of model.onnx"),
    ],
)
def test_named_without_servers_or_an_export_of_this_model_it_refuses_to_start(
    tmp_path: Path, endpoints: tuple[str, ...], export: object, error: type[Exception], needle: str
) -> None:
    engines = tmp_path / "engines"
    if export:
        _export(engines, onnx_sha="f" * 64 if export == "stale" else None)
    with pytest.raises(error) as raised:
        choose_artifact(load_manifest(MODEL), _triton(*endpoints), engines)
    assert needle in str(raised.value)


def test_an_address_that_is_not_host_port_is_refused_in_the_config() -> None:
    with pytest.raises(ValueError, match="'triton-1' is not host:port"):
        _triton("triton-1")


def test_with_no_server_answering_the_local_artifact_serves_and_says_so(tmp_path: Path) -> None:
    """A real refused connection: the failover starts on this host's FP32 model, the fault is a degradation
    (health stays SERVING), each result names the backend that ran it; closing it ends the fault."""
    engines = tmp_path / "engines"
    _export(engines)
    faults = Faults()
    loaded = load_manifest(MODEL)
    served = open_served(loaded, _triton(f"127.0.0.1:{free_port()}", check_timeout_s=2), engines, faults)
    backend = served.backend
    try:
        assert isinstance(backend, Failover) and backend.name == "triton" and backend.serving_locally()
        assert faults.holds(FAULT) and not faults.holding_back()
        (problem,) = faults.problems()
        assert problem.startswith("Inference runs on this host's onnxruntime artifact, not the inference servers")
        assert "UNAVAILABLE" in problem and "checked again until one answers" in problem
        assert "onnxruntime fp32 serves while no server answers" in served.reason
        batch = np.random.default_rng(0).random((3, *expected_sample_shape(loaded)), dtype=np.float32)
        out = backend.run(batch)
        local = backend.local.run(batch)
        assert out.ran_on == "onnxruntime" and np.array_equal(out.scores, local.scores)
    finally:
        backend.close()
    assert not faults.holds(FAULT)
