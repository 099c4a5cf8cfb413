"""The remote backend against the real Triton (tests/peers/triton.py), in-process through the loader and the failover:
what `make engine TARGET=triton` exported, served by one or two servers, answers as ONNX Runtime here does (scores
and heatmaps), in batches no larger than the servers take; a server with another model, a self-check with other
scores or a certificate not trusted is refused and the local artifact serves; two servers share the batches and one
killed costs none; a new model version is checked before it is used."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from appliance.api.certs import make_server, make_terminal
from appliance.config import InferenceConfig
from appliance.domain.faults import Faults
from appliance.domain.manifest import load_manifest
from appliance.inference.artifacts import read_sidecar, sha256_file, write_sidecar
from appliance.inference.backends.triton import record_path
from appliance.inference.failover import FAULT, Failover
from appliance.inference.loader import Served, expected_sample_shape, open_served
from appliance.kserve import triton_config_pb2 as tc
from build_engine import triton_repo
from tests.peers.triton import Triton, needs_triton
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, needs_triton]

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"
NAME = "pipeline-test"  # the model's name on the servers, as exported
MAX_BATCH = 4  # exported smaller than the manifest's 16: the servers' limit, not this host's
ATOL = 1e-5
LOADED = load_manifest(MODEL)
SAMPLE = expected_sample_shape(LOADED)
TRITON_LOG = "appliance.inference.backends.triton"


# --- the export and the servers, once per module ---------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> triton_repo.Exported:
    """`make engine TARGET=triton REPO=dir` as the CLI runs it (FP32, max batch 4): the repository the servers
    load, and the record (sidecar and self-check) the appliance keeps in its engines folder."""
    root = tmp_path_factory.mktemp("triton-export")
    options = triton_repo.ExportOptions(
        model_dir=MODEL, engines_dir=root / "engines", repo=root / "repo", precision="fp32", max_batch=MAX_BATCH
    )
    return triton_repo.export(options, out=lambda line: None)


@pytest.fixture(scope="module")
def servers(exported: triton_repo.Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Triton]]:
    """Two servers of the exported repository; a test that kills one starts it again (`running`)."""
    repo = exported.folder.parent
    with (
        Triton(repo, [NAME], root=tmp_path_factory.mktemp("triton-a")) as a,
        Triton(repo, [NAME], root=tmp_path_factory.mktemp("triton-b")) as b,
    ):
        yield [a, b]


@pytest.fixture
def running(servers: list[Triton]) -> list[Triton]:
    for server in servers:
        if not server.running:
            server.start()
    return servers


@pytest.fixture
def engines(exported: triton_repo.Exported, tmp_path: Path) -> Path:
    """This test's own copy of the engines folder the export wrote into (a test may alter its record)."""
    folder = tmp_path / "engines"
    shutil.copytree(exported.engines_sidecar.parent.parent, folder)
    return folder


def _open(engines: Path, *servers: Triton | str, faults: Faults | None = None, **settings: object) -> Served:
    endpoints = [s if isinstance(s, str) else s.grpc_address for s in servers]
    config = InferenceConfig(backend="triton", triton={"endpoints": endpoints, **settings})
    return open_served(LOADED, config, engines, faults)


def _failover(served: Served) -> Failover:
    assert isinstance(served.backend, Failover), served.reason
    return served.backend


def _images(count: int, seed: int = 22) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *SAMPLE), dtype=np.float32)


def _rows_since(server: Triton, before: int, rows: int) -> list[int]:
    """The server's batches after the first ``before``, once they hold ``rows`` rows (the backend stub's log line
    need not be written before the answer arrives)."""
    return eventually(
        lambda: server.batch_sizes()[before:],
        f"{rows} rows in {server.grpc_address}'s logged batches",
        until=lambda sizes: sum(sizes) >= rows,
        timeout=30,
    )


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


def _same_as_local(failover: Failover, batch: np.ndarray) -> None:
    """The batch ran on the servers and gave what this host's ONNX Runtime gives, scores and heatmaps."""
    remote, local = failover.run(batch), failover.local.run(batch)
    assert remote.ran_on == "" and local.heatmap is not None and remote.heatmap is not None
    np.testing.assert_allclose(remote.scores, local.scores, rtol=0, atol=ATOL)
    np.testing.assert_allclose(remote.heatmap, local.heatmap, rtol=0, atol=ATOL)


# --- 1. what the servers answer -------------------------------------------------------------------------------


def test_the_export_carries_the_heatmap_and_the_servers_batch_limit(exported: triton_repo.Exported) -> None:
    config = text_format.Parse(exported.config.read_text(), tc.ModelConfig())
    manifest = LOADED.manifest
    assert manifest.heatmap is not None and exported.heatmap
    assert [o.name for o in config.output] == [manifest.output.name, manifest.heatmap.output]
    assert config.max_batch_size == MAX_BATCH == exported.sidecar_data.max_batch
    graph = onnx.load(str(exported.artifact), load_external_data=False).graph
    assert manifest.heatmap.output in [o.name for o in graph.output]
    assert read_sidecar(exported.engines_sidecar).key.backend == "triton"


def test_scores_and_heatmaps_equal_onnx_runtime_in_process(running: list[Triton], engines: Path) -> None:
    """Every batch size up to the servers' max_batch_size, against the local backend on the FP32 ONNX with the
    heatmap added (what serves here when no server answers)."""
    a = running[0]
    served = _open(engines, a)
    failover = _failover(served)
    try:
        assert not failover.serving_locally() and failover.has_heatmap
        # The batcher takes its largest batch from here: the server's max_batch_size, below the manifest's 16.
        assert failover.max_batch == failover.remote.max_batch == MAX_BATCH < LOADED.manifest.batching.max_batch
        before = len(a.batch_sizes())
        images = _images(1 + 2 + 3 + 4)
        start = 0
        for size in range(1, MAX_BATCH + 1):
            _same_as_local(failover, images[start : start + size])
            start += size
        sizes = _rows_since(a, before, len(images))
        assert sum(sizes) == len(images) and max(sizes) <= MAX_BATCH
    finally:
        failover.close()


def test_a_server_back_with_a_smaller_max_batch_takes_larger_batches_in_pieces(
    running: list[Triton], engines: Path
) -> None:
    """Loaded with no server answering, the batcher's largest batch is the local artifact's (16); a server that comes
    back with max_batch_size 4 gets a batch of 8 as pieces of at most 4, and the rows come back in order."""
    b = running[1]
    b.kill()
    served = _open(engines, b)
    failover = _failover(served)
    try:
        assert failover.serving_locally() and failover.max_batch == LOADED.manifest.batching.max_batch
        b.start()
        eventually(lambda: not failover.serving_locally(), "the restarted server serving", timeout=30)
        before = len(b.batch_sizes())
        _same_as_local(failover, _images(8, seed=8))
        sizes = _rows_since(b, before, 8)
        assert sum(sizes) == 8 and max(sizes) <= MAX_BATCH
    finally:
        failover.close()


# --- 2-4. servers refused: the local artifact serves -------------------------------------------------------------


def _other_shape_model(repo: Path, name: str) -> None:
    """A real model of another input size under ``name`` in the servers' repository, written by hand: 32x32 images
    averaged to one logit."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])
    logit = helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1])
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logit"], axis=1),
        ],
        "other-shape",
        [image],
        [logit],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH}\n'
        'input [{ name: "image" data_type: TYPE_FP32 dims: [1, 32, 32] }]\n'
        'output [{ name: "logit" data_type: TYPE_FP32 dims: [1] }]\n'
        "instance_group [{ kind: KIND_CPU count: 1 }]\n"
    )


def test_a_server_whose_model_takes_another_shape_is_refused(
    running: list[Triton], engines: Path, exported: triton_repo.Exported
) -> None:
    """The record here names model 'pipeline-small'; the server's model of that name takes 32x32 images."""
    a = running[0]
    name = "pipeline-small"
    if not (exported.folder.parent / name).exists():
        _other_shape_model(exported.folder.parent, name)
    a.load(name)
    record = read_sidecar(exported.engines_sidecar)
    folder = engines / LOADED.manifest.model.name
    write_sidecar(
        record_path(folder, name), record.model_copy(update={"recipe": {**record.recipe, "triton_model": name}})
    )

    served = _open(engines, a, model=name)
    try:
        assert not isinstance(served.backend, Failover) and served.backend.name == "onnxruntime"
        assert served.reason.startswith("no artifact before it may be served here; the inference servers were refused")
        assert (
            f"Triton model 'pipeline-small' was refused on every server: {a.grpc_address}: model 'pipeline-small' "
            "takes 'image' [N, 1, 32, 32] float32 there; the manifest says 'image' [N, 1, 64, 64] float32"
        ) in served.reason
        scores = served.backend.infer(_images(2))
        assert scores.shape == (2, 1)
    finally:
        served.backend.close()


def test_a_server_whose_model_lacks_the_heatmap_is_refused(
    running: list[Triton], engines: Path, exported: triton_repo.Exported
) -> None:
    """The model as trained (no heatmap output) served under the name the record gives: the manifest declares a
    heatmap and the appliance asks for it, so the server is refused, saying which output it lacks."""
    a = running[0]
    name = "pipeline-plain"
    repo = exported.folder.parent
    if not (repo / name).exists():
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(MODEL / "model.onnx", repo / name / "1" / "model.onnx")
        config = (exported.folder / "config.pbtxt").read_text()
        config = config.replace(f'name: "{NAME}"', f'name: "{name}"')
        heatmap = config.index('output {\n  name: "heatmap"')
        config = config[:heatmap] + config[config.index("}\n", heatmap) + 2 :]
        (repo / name / "config.pbtxt").write_text(config)
    a.load(name)
    record = read_sidecar(exported.engines_sidecar)
    write_sidecar(
        record_path(engines / LOADED.manifest.model.name, name),
        record.model_copy(update={"recipe": {**record.recipe, "triton_model": name}}),
    )
    served = _open(engines, a, model=name)
    try:
        assert served.backend.name == "onnxruntime"
        assert (
            f"{a.grpc_address}: model 'pipeline-plain' has no output 'heatmap' there, the heatmap the manifest "
            "declares; export it again with `make engine TARGET=triton` (or set inference.heatmaps = false)"
        ) in served.reason
    finally:
        served.backend.close()


def test_a_self_check_with_other_scores_is_refused(running: list[Triton], engines: Path) -> None:
    """The record's self-check rewritten with moved scores (and its sha256 in the sidecar, so only the scores tell):
    the server reproduces the exported model's scores, not those, and is refused."""
    a = running[0]
    folder = engines / LOADED.manifest.model.name
    record = record_path(folder, NAME)
    sidecar = read_sidecar(record)
    assert sidecar.self_check is not None
    check_file = folder / sidecar.self_check.file
    with np.load(check_file) as data:
        inputs, scores = data["inputs"], data["scores"]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=inputs, scores=np.clip(scores + 0.05, 0, 1).astype(scores.dtype))
    check_file.write_bytes(buffer.getvalue())
    write_sidecar(
        record,
        sidecar.model_copy(
            update={"self_check": sidecar.self_check.model_copy(update={"sha256": sha256_file(check_file)})}
        ),
    )

    served = _open(engines, a)
    try:
        assert not isinstance(served.backend, Failover) and served.backend.name == "onnxruntime"
        assert (
            "the inference servers were refused: Triton model 'pipeline-test' was refused on every server"
            in served.reason
        )
        assert (
            f"{a.grpc_address}: The artifact {NAME} failed its self-check: on 4 of 4 of its gate's images"
            in served.reason
        )
    finally:
        served.backend.close()


def test_tls_to_the_server_and_a_certificate_not_trusted(
    exported: triton_repo.Exported, engines: Path, tmp_path: Path
) -> None:
    """Triton with a server certificate and mutual TLS: the CA and a client certificate serve remotely; the client
    certificate without the CA (the server's certificate cannot be trusted) leaves the local artifact serving, and
    the fault says the handshake failed."""
    certs = tmp_path / "certs"
    make_server(certs, ["localhost"], ["127.0.0.1"])
    client = make_terminal(certs, "appliance")
    cert, key = str(client / "appliance.crt"), str(client / "appliance.key")
    tls = {"tls_cert": certs / "server.crt", "tls_key": certs / "server.key", "tls_client_ca": certs / "ca.crt"}
    with Triton(exported.folder.parent, [NAME], root=tmp_path / "triton", **tls) as server:
        served = _open(engines, server, tls_ca=str(certs / "ca.crt"), tls_cert=cert, tls_key=key)
        failover = _failover(served)
        try:
            assert not failover.serving_locally()
            _same_as_local(failover, _images(2))
        finally:
            failover.close()

        faults = Faults()
        served = _open(engines, server, faults=faults, tls_cert=cert, tls_key=key)
        failover = _failover(served)
        try:
            assert failover.serving_locally() and failover.run(_images(1)).ran_on == "onnxruntime"
            (problem,) = faults.problems()
            assert problem.startswith("Inference runs on this host's onnxruntime artifact, not the inference servers")
            assert server.grpc_address in problem and "handshake failed" in problem.lower()
        finally:
            failover.close()


# --- 5. two servers -------------------------------------------------------------------------------------------


BALANCES = ["least_outstanding", "round_robin"]


@pytest.mark.parametrize("balance", BALANCES)
def test_both_servers_get_batches(running: list[Triton], engines: Path, balance: str) -> None:
    """One batch at a time, as the daemon's batcher sends them: each server gets some."""
    served = _open(engines, *running, balance=balance)
    failover = _failover(served)
    try:
        before = [len(s.batch_sizes()) for s in running]
        for start in range(0, 12, 2):
            _same_as_local(failover, _images(12)[start : start + 2])
        rows = eventually(
            lambda: [sum(s.batch_sizes()[n:]) for s, n in zip(running, before, strict=True)],
            "the 12 rows in the servers' logged batches",
            until=lambda rows: sum(rows) >= 12,
            timeout=30,
        )
        assert sum(rows) == 12
        assert all(rows), f"batch rows per server: {rows}"
    finally:
        failover.close()


def test_one_of_two_killed_the_other_takes_every_batch(
    running: list[Triton], engines: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed while both serve: the batch sent to it goes to the other at once; every batch is answered by a server
    (none lost, none run locally), the killed one out of the rotation."""
    a, b = running
    caplog.set_level(logging.INFO, logger=TRITON_LOG)
    served = _open(engines, a, b, balance="round_robin")
    failover = _failover(served)
    try:
        images = _images(12, seed=5)
        _same_as_local(failover, images[:2])
        _same_as_local(failover, images[2:4])
        b.kill()
        before = len(a.batch_sizes())
        for start in range(4, 12, 2):
            _same_as_local(failover, images[start : start + 2])  # none lost, none run locally
        assert sum(_rows_since(a, before, 8)) == 8
        assert _logged(caplog, f"Triton server {b.grpc_address} left the rotation: UNAVAILABLE")
        assert not failover.serving_locally()
    finally:
        failover.close()


def test_a_killed_server_started_again_rejoins_the_rotation(
    running: list[Triton], engines: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With probe_max_s 0.5, a server that left is checked again within about a second of its back-off ending."""
    a, b = running
    caplog.set_level(logging.INFO, logger=TRITON_LOG)
    served = _open(engines, a, b, balance="round_robin", probe_max_s=0.5)
    failover = _failover(served)
    try:
        b.kill()
        for start in range(0, 4, 2):
            _same_as_local(failover, _images(4, seed=6)[start : start + 2])
        assert _logged(caplog, f"Triton server {b.grpc_address} left the rotation")
        b.start()
        eventually(
            lambda: _logged(caplog, f"Triton server {b.grpc_address} serves again model {NAME}"),
            "the restarted server checked again and back in the rotation",
            timeout=5,  # ten times probe_max_s: only a watch that does not check it fails this
        )
        before = len(b.batch_sizes())
        for start in range(0, 8, 2):
            _same_as_local(failover, _images(8, seed=7)[start : start + 2])
        assert sum(_rows_since(b, before, 1)) > 0
    finally:
        failover.close()


# --- 6. a new model version -----------------------------------------------------------------------------------


def test_a_new_model_version_is_checked_before_it_is_used(
    exported: triton_repo.Exported, engines: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model exported again as version 2 and loaded (explicit model control) while the appliance serves: the
    first answer from version 2 is not used (the batch runs locally), the server is checked again and serves
    version 2."""
    caplog.set_level(logging.INFO, logger=TRITON_LOG)
    repo = tmp_path / "repo"
    shutil.copytree(exported.folder.parent, repo, ignore=shutil.ignore_patterns("pipeline-small"))
    with Triton(repo, [NAME], root=tmp_path / "triton") as server:
        faults = Faults()
        served = _open(engines, server, faults=faults)
        failover = _failover(served)
        try:
            _same_as_local(failover, _images(2))
            triton_repo.export(
                triton_repo.ExportOptions(
                    model_dir=MODEL, engines_dir=engines, repo=repo, precision="fp32", max_batch=MAX_BATCH,
                    triton_version=2,
                ),
                out=lambda line: None,
            )  # fmt: skip
            server.load(NAME)
            assert server.get(f"/v2/models/{NAME}")["versions"] == ["2"]

            out = failover.run(_images(3, seed=3))
            assert out.ran_on == "onnxruntime"  # not the unchecked version's answer
            assert _logged(caplog, "changed from version 1 to 2")
            eventually(
                lambda: _logged(caplog, f"Triton server {server.grpc_address} serves again model {NAME} version 2"),
                "the server checked again on version 2",
                timeout=30,
            )
            eventually(lambda: not faults.holds(FAULT), "the fallback over", timeout=30)
            _same_as_local(failover, _images(3, seed=4))
        finally:
            failover.close()
