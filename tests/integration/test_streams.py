"""Hundreds of terminals follow the stream without a thread each; a stalled one slows no one and resumes
from the journal; health and status answer throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import drop, png_bytes

STREAMS = 300
FILES = 40


async def _follow(call: aio.UnaryStreamCall, want: int) -> list[int]:
    seen: list[int] = []
    async for r in call:
        seen.append(r.sequence)
        if len(seen) >= want:
            call.cancel()
            break
    return seen


async def _scenario(target: str, incoming: Path) -> None:
    channels = [aio.insecure_channel(target) for _ in range(8)]
    stubs = [pb_grpc.ScoringStub(ch) for ch in channels]
    try:
        calls = [stubs[i % 8].StreamResults(pb.StreamResultsRequest(since_sequence=0)) for i in range(STREAMS)]
        # A stalled terminal: opens its stream, reads one result, then stops reading for the whole burst.
        stalled = stubs[0].StreamResults(pb.StreamResultsRequest(since_sequence=0))
        for call in [*calls, stalled]:  # each stream is open on the server before the burst
            await call.initial_metadata()
        followers = [asyncio.create_task(_follow(call, FILES)) for call in calls]
        health = health_pb2_grpc.HealthStub(channels[1])
        for i in range(FILES):
            drop(incoming, f"burst-{i:03d}.png", png_bytes(9100 + i))
        first = await stalled.read()
        assert first.sequence == 1
        # While 300 streams are open and one is stalled: health, status and a new stream all answer.
        check = await health.Check(health_pb2.HealthCheckRequest(service="appliance.v1.Scoring"), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        results = await asyncio.wait_for(asyncio.gather(*followers), timeout=180)
        expected = list(range(1, FILES + 1))
        assert all(seen == expected for seen in results), "every terminal gets every result, in order, once"
        status = await stubs[2].GetStatus(pb.GetStatusRequest(), timeout=10)
        assert status.last_sequence == FILES
        # The stalled terminal reads again: everything it missed, in order, nothing doubled.
        rest = [(await stalled.read()).sequence for _ in range(FILES - 1)]
        assert [first.sequence, *rest] == expected
        stalled.cancel()
    finally:
        for ch in channels:
            await ch.close()


def test_hundreds_of_streams_and_a_stalled_reader(make_daemon: type) -> None:
    d = make_daemon(server={"max_streams_per_terminal": 1000}, watch={"rescan_interval_s": 0})
    d.start()
    asyncio.run(_scenario(d.target, d.incoming))
    assert d.status().scored == FILES


def test_a_terminal_over_its_stream_limit_is_refused_clearly(make_daemon: type) -> None:
    d = make_daemon(server={"max_streams_per_terminal": 3})
    d.start()

    async def scenario() -> None:
        async with aio.insecure_channel(d.target) as ch:
            stub = pb_grpc.ScoringStub(ch)
            open_calls = [stub.StreamResults(pb.StreamResultsRequest()) for _ in range(3)]
            for call in open_calls:
                await call.initial_metadata()
            extra = stub.StreamResults(pb.StreamResultsRequest())
            try:
                await extra.read()
                raise AssertionError("a fourth stream was accepted")
            except aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "3 result streams open already" in (e.details() or "")
            for call in open_calls:
                call.cancel()

    asyncio.run(scenario())
