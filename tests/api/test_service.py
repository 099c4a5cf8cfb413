"""The gRPC service in-process: the real server, intake, scoring stages and journal on loopback, with a real
client; only the daemon's status callbacks are stood in for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from appliance.api.grpc_server import GrpcServer
from appliance.api.metrics import Metrics
from appliance.api.service import Hooks, ScoringService
from appliance.config import ServerConfig
from appliance.domain.faults import Faults
from appliance.domain.manifest import load_manifest
from appliance.inference.loader import open_backend
from appliance.intake.intake import Intake
from appliance.journal.journal import Journal
from appliance.scoring.stages import ScoringStages
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.in_process import in_process_config
from tests.integration.conftest import TEST_MODEL, png_bytes


@dataclass
class Served:
    stub: pb_grpc.ScoringStub
    metrics: Metrics
    problems: list[str] = field(default_factory=list)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    config = in_process_config(tmp_path, server=ServerConfig(port=0, tokens_file=tmp_path / "data" / "tokens.json"))
    loaded = load_manifest(TEST_MODEL)
    backend = open_backend(loaded, config.inference, config.model.engines_dir)
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    metrics = Metrics()
    stages = ScoringStages(config, loaded.manifest, backend, journal, metrics, faults=Faults())
    intake = Intake(journal, stages, config.watch, on_duplicate=metrics.duplicates.inc)
    problems: list[str] = []
    hooks = Hooks(
        model_info=lambda: pb.ModelInfo(name=loaded.manifest.model.name),
        status=lambda: pb.Status(last_sequence=journal.last_sequence(), problems=problems),
        problem=lambda: problems[0] if problems else None,
        reload=lambda: pb.ReloadModelResponse(reloaded=False, message="not in this test"),
    )
    service = ScoringService(journal, intake, tmp_path / "data" / "spool", hooks, metrics, config.server)
    server = GrpcServer(service, config.server)
    stages.start()
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(pb_grpc.ScoringStub(channel), metrics, problems)
    finally:
        channel.close()
        server.stop(grace=1.0)
        stages.stop(timeout=10)
        backend.close()
        journal.close()


def test_score_then_the_same_image_again_is_answered_from_the_journal(served: Served) -> None:
    image = png_bytes(21)
    first = served.stub.Score(pb.ScoreRequest(image=image, file_name="a.png"), timeout=60)
    assert first.outcome == pb.OUTCOME_SCORED and first.sequence == 1 and first.source == "grpc"
    again = served.stub.Score(pb.ScoreRequest(image=image, file_name="a-again.png"), timeout=60)
    assert again.sequence == first.sequence and again.file_name == "a.png"
    assert served.metrics.registry.get_sample_value("appliance_duplicates_total") == 1.0
    stream = served.stub.StreamResults(pb.StreamResultsRequest(since_sequence=0), timeout=30)
    assert next(iter(stream)).sequence == 1
    stream.cancel()
    assert served.stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence == 1


def test_a_fault_refuses_score_with_its_sentence_and_lookups_still_answer(served: Served) -> None:
    served.problems.append("The data disk is full.")
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Score(pb.ScoreRequest(image=png_bytes(22)), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details() == "Not taking images now: The data disk is full."
    assert list(served.stub.GetStatus(pb.GetStatusRequest(), timeout=10).problems) == ["The data disk is full."]
    with pytest.raises(grpc.RpcError) as e:
        served.stub.GetResult(pb.GetResultRequest(sequence=2**63), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
