"""Score against what a hostile or broken caller sends: too big, empty, random, and too often."""

from __future__ import annotations

import os

import grpc
import pytest

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import png_bytes


def test_oversized_empty_random_and_flooded_score_calls(make_daemon: type) -> None:
    # One call per 100 s: the random payload takes the one call the bucket holds; however slow the machine,
    # the flood after it finds the bucket empty.
    d = make_daemon(server={"max_message_mb": 1, "score_rate_per_terminal": 0.01})
    d.start()
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(pb.ScoreRequest(image=os.urandom(2 * 1024 * 1024)), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused by gRPC at the message limit
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(pb.ScoreRequest(image=b""), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in (e.value.details() or "")
        r = stub.Score(pb.ScoreRequest(image=os.urandom(4096), file_name="noise.bin"), timeout=30)
        assert r.outcome == pb.OUTCOME_REJECTED and r.rejection.code == "unsupported_format"
        # A flood from one terminal: past its rate, calls are refused with a sentence, not queued.
        refused = []
        for i in range(12):
            try:
                stub.Score(pb.ScoreRequest(image=png_bytes(40_000 + i)), timeout=30)
            except grpc.RpcError as err:
                refused.append(err)
        assert len(refused) == 12 and all(err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for err in refused)
        assert "Score calls per second from this terminal" in (refused[0].details() or "")
    # The daemon is unharmed: health, status and the spool are as they should be.
    status = d.status()
    assert status.ready and not list((d.root / "data" / "spool").glob("*.tmp"))
