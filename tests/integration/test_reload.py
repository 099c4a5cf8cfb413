"""Hot model reload: a new model swapped in during a burst loses and fails nothing; a bad one is refused
and the old one serves on."""

from __future__ import annotations

import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import TEST_MODEL, Daemon, png_bytes
from tests.waiting import eventually

BURST = 120


def wait_for_log(d: Daemon, words: str, timeout: float = 120.0) -> None:
    eventually(d.log, f"{words!r} in the log", until=lambda log: words in log, timeout=timeout, every=0.1)


def _model_copy(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(TEST_MODEL, model, ignore=shutil.ignore_patterns("calibration", "validation*"))
    return model


def _set_version(model: Path, version: str) -> None:
    toml = model / "model.toml"
    text = toml.read_text()
    old = next(line for line in text.splitlines() if line.startswith("version = "))
    toml.write_text(text.replace(old, f'version = "{version}"'))


def test_a_reload_during_a_burst_fails_no_request(make_daemon: type, tmp_path: Path) -> None:
    model = _model_copy(tmp_path)
    d = make_daemon(model=model, server={"score_rate_per_terminal": 1000.0, "max_scores": 16})
    d.start()
    _set_version(model, "1.0.1")
    results: list[pb.Result] = []
    errors: list[grpc.RpcError] = []
    reloaded = threading.Event()
    answer: list[pb.ReloadModelResponse] = []

    def score(i: int) -> None:
        if i >= BURST - 8:  # the burst's tail comes after the swap, however the threads are scheduled
            assert reloaded.wait(300)
        with d.channel() as ch:
            stub = pb_grpc.ScoringStub(ch)
            try:
                results.append(stub.Score(pb.ScoreRequest(image=png_bytes(30_000 + i)), timeout=120))
            except grpc.RpcError as e:
                errors.append(e)
            if i == BURST // 3:  # a third of the way in, an admin reloads
                answer.append(stub.ReloadModel(pb.ReloadModelRequest(), timeout=300))
                reloaded.set()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(score, range(BURST)))
    assert reloaded.is_set()
    assert answer[0].reloaded, answer[0].message
    assert answer[0].model.version == "1.0.1"
    assert not errors, [e.details() for e in errors]
    assert len(results) == BURST and all(r.outcome == pb.OUTCOME_SCORED for r in results)
    versions = {r.model_version for r in results}
    assert versions == {"1.0.0", "1.0.1"}, "results carry the version that scored them"
    status = d.status()
    assert status.model_generation == 1 and status.model.version == "1.0.1" and status.scored == BURST


def test_a_bad_model_is_refused_and_the_old_one_serves_on(make_daemon: type, tmp_path: Path) -> None:
    model = _model_copy(tmp_path)
    d = make_daemon(model=model)
    d.start()
    (model / "model.onnx").write_bytes(b"not an onnx model")
    _set_version(model, "2.0.0")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)  # systemctl reload
    wait_for_log(d, "The new model was refused and the one loaded before serves on")
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        answer = stub.ReloadModel(pb.ReloadModelRequest(), timeout=300)
        assert not answer.reloaded
        assert "refused" in answer.message and answer.model.version == "1.0.0"
        r = stub.Score(pb.ScoreRequest(image=png_bytes(31_000)), timeout=60)
    assert r.outcome == pb.OUTCOME_SCORED and r.model_version == "1.0.0"
    assert d.status().model_generation == 0
