"""The result feed's window (appliance/api/feed.py) on a real journal: it holds the last WINDOW results published
since the feed started; a stream behind it reads the journal a page at a time and carries on in the window from
the result just before the window's first, so a terminal gets every result once, in order, whatever its cursor."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from appliance.api.codec import encoded
from appliance.api.feed import PAGE, WINDOW, Published, ResultFeed
from appliance.api.grpc_server import GrpcServer
from appliance.api.service import Hooks, ScoringService
from appliance.config import ServerConfig
from appliance.journal import payload
from appliance.journal.journal import Journal, NewResult
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.in_process import ScoringCore, scoring_core
from tests.journal.test_payload import REJECTED
from tests.waiting import eventually


def _stored(journal: Journal, count: int) -> list[int]:
    """``count`` results stored in one group commit, as the stages store a burst; their sequences."""
    ids = [
        journal.register(
            source="grpc", path=None, file_name="upload", size=1, mtime_ns=0, content_hash=os.urandom(32).hex()
        ).input.id
        for _ in range(count)
    ]
    row = NewResult(frame_index=0, outcome="rejected", sop_uid="", payload=payload.encode(REJECTED))
    return [seq for seqs in journal.complete_many([(input_id, [row]) for input_id in ids]) for seq in seqs]


def _as_streamed(journal: Journal, seqs: list[int]) -> list[Published]:
    """What a stream reading the journal sends for these results: the window must send the same bytes."""
    out = []
    for seq in seqs:
        stored = journal.result_by_seq(seq)
        assert stored is not None
        out.append(Published(seq, "image", encoded(stored.result())))
    return out


async def _published_through(feed: ResultFeed, seq: int) -> None:
    """Until the window reaches ``seq``, woken by each publication (the bound only catches a broken test)."""
    async with asyncio.timeout(60):
        while feed.published < seq:
            await feed.wait_past(feed.published, 3600)


@contextmanager
def _feed(journal: Journal) -> Iterator[ResultFeed]:
    feed = ResultFeed(journal, asyncio.get_running_loop())
    feed.start()
    try:
        yield feed
    finally:
        feed.stop()


def test_the_window_starts_with_the_feed_and_a_reader_of_the_journal_carries_on_in_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    before = _stored(journal, 5)  # stored before the feed started: in the journal only

    async def scenario() -> None:
        with _feed(journal) as feed:
            assert feed.after(0) is None  # behind the window: the stream reads the journal
            assert feed.after(before[-1]) == []  # caught up: the stream waits for the next result
            since = _stored(journal, 3)
            await _published_through(feed, since[-1])
            # A stream that has read the journal up to the window's start carries on in the window, no gap.
            assert feed.after(before[-1]) == _as_streamed(journal, since)
            assert feed.after(since[0]) == _as_streamed(journal, since[1:])
            assert feed.after(before[-2]) is None  # before[-1] is in the journal only
            assert feed.after(since[-1]) == []

    asyncio.run(scenario())
    journal.close()


def test_the_window_keeps_the_last_window_results_and_serves_a_page_at_a_time(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")

    async def scenario() -> None:
        with _feed(journal) as feed:
            seqs = _stored(journal, WINDOW + PAGE + 1)
            await _published_through(feed, seqs[-1])
            kept = seqs[-WINDOW:]
            assert feed.after(kept[0] - 2) is None  # fallen out of the window: the journal has it
            for cursor in (kept[0] - 1, kept[0], kept[-PAGE - 1], kept[-2]):
                assert feed.after(cursor) == _as_streamed(journal, [s for s in kept if s > cursor][:PAGE])

    asyncio.run(scenario())
    journal.close()


def test_a_stream_waiting_past_its_cursor_wakes_with_the_next_result(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")

    async def scenario() -> None:
        with _feed(journal) as feed:
            cursor = feed.published
            waiting = asyncio.ensure_future(feed.wait_past(cursor, 3600))  # far past the test's own bound
            (seq,) = await asyncio.to_thread(_stored, journal, 1)
            async with asyncio.timeout(60):  # a bound on a broken test: only a publication ends it sooner
                await waiting
            assert feed.after(cursor) == _as_streamed(journal, [seq])

    asyncio.run(scenario())
    journal.close()


@contextmanager
def _served(core: ScoringCore, tmp_path: Path) -> Iterator[tuple[ScoringService, pb_grpc.ScoringStub]]:
    """The real gRPC service on loopback over the core's journal; its feed starts with the server."""
    config = ServerConfig(port=0, tokens_file=tmp_path / "data" / "tokens.json")
    hooks = Hooks(
        model_info=lambda: pb.ModelInfo(name="pipeline-test"),
        status=lambda: pb.Status(last_sequence=core.journal.last_sequence()),
        problem=lambda: None,
        reload=lambda: pb.ReloadModelResponse(reloaded=False, message="not in this test"),
    )
    service = ScoringService(core.journal, core.intake, tmp_path / "data" / "spool", hooks, core.metrics, config)
    server = GrpcServer(service, config)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield service, pb_grpc.ScoringStub(channel)
    finally:
        channel.close()
        server.stop(grace=1.0)


def test_a_terminal_resuming_behind_the_window_gets_every_result_once_in_order(tmp_path: Path) -> None:
    """From sequence 0: the results stored before the start and those fallen out of the window come from the
    journal, the rest from the window, then the results stored while the stream is open."""
    with scoring_core(tmp_path) as core:
        stored = _stored(core.journal, 10)
        with _served(core, tmp_path) as (service, stub):
            stored += _stored(core.journal, WINDOW + PAGE + 44)
            feed = service.feed
            assert feed is not None
            eventually(lambda: feed.published, "the window full", until=lambda seq: seq == stored[-1])
            stream = stub.StreamResults(pb.StreamResultsRequest(since_sequence=0), timeout=60)
            got = [next(stream).sequence for _ in stored]
            live = _stored(core.journal, 3)
            got += [next(stream).sequence for _ in live]
            stream.cancel()
    assert got == stored + live
