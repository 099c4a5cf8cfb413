"""The `appliance.v1.Scoring` gRPC service (asyncio): score, stream (resumable), look up, describe, reload.

Every call runs on the server's event loop; what blocks (the journal, waiting for a score, loading a
model) runs in thread pools of its own, so hundreds of open streams hold no thread, and health checks
and status calls always answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc import aio

from appliance.api.auth import Caller, Refused, caller
from appliance.api.codec import encoded_stored, stored_message, to_message
from appliance.api.feed import PAGE, Kind, ResultFeed
from appliance.api.metrics import Metrics
from appliance.api.tls import INSECURE_PROBLEM, insecure_exposure
from appliance.api.tokens import Scope
from appliance.config import ServerConfig
from appliance.domain.errors import ApplianceError
from appliance.domain.result import Result
from appliance.files import spool
from appliance.files.content_hash import digest_bytes
from appliance.intake.intake import Arrival, Intake
from appliance.journal.journal import Journal
from appliance.scheduling import lower_this_thread
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STREAM_WAKE_S = 5.0  # an idle stream looks again this often (a missed wake-up costs at most this)
SCORE_TIMEOUT_S = 120.0
LOOKUP_THREADS = 4
SCORE_METHOD = "/appliance.v1.Scoring/Score"
LOCAL = Caller("local", Scope.admin)  # where no token is required (a loopback-only appliance)
KINDS: dict[int, Kind] = {pb.RESULT_KIND_IMAGE: "image", pb.RESULT_KIND_SERIES: "series"}
IMAGES_ONLY: frozenset[Kind] = frozenset({"image"})  # what a request naming no kind gets: as before series results


@dataclass(frozen=True)
class Hooks:
    """What the service asks the daemon (the daemon owns these; the service only calls them)."""

    model_info: Callable[[], pb.ModelInfo]
    status: Callable[[], pb.Status]
    problem: Callable[[], str | None]  # why new inputs are not taken now (disk full, ...), else None
    reload: Callable[[], pb.ReloadModelResponse]


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, sentence: str) -> None:
        super().__init__(sentence)
        self.code = code
        self.sentence = sentence


class _TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        # Bursts of twice the rate, and at least one call: below 0.5/s a smaller bucket never holds a whole call.
        self.capacity = max(1.0, 2 * rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


class ScoringService(pb_grpc.ScoringServicer):
    def __init__(
        self,
        journal: Journal,
        intake: Intake,
        spool_dir: Path,
        hooks: Hooks,
        metrics: Metrics,
        limits: ServerConfig,
    ) -> None:
        self.journal = journal
        self.intake = intake
        self.spool_dir = spool_dir
        self.hooks = hooks
        self.metrics = metrics
        self.limits = limits
        self.insecure = insecure_exposure(limits)
        metrics.insecure.set(1 if self.insecure else 0)
        metrics.count_open_series(journal.open_series)
        self.feed: ResultFeed | None = None  # set once the server's loop runs (bind)
        self._streams: defaultdict[str, int] = defaultdict(int)
        self._scores = 0
        self._rates: dict[str, _TokenBucket] = {}
        # Score waits for its result (up to SCORE_TIMEOUT_S); lookups must never queue behind those waits.
        # Score calls hash and spool what they were sent: feeders (appliance/scheduling.py).
        self._scoring = ThreadPoolExecutor(limits.max_scores, thread_name_prefix="grpc-score",
                                           initializer=lower_this_thread)  # fmt: skip
        self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="grpc-lookup")
        spool.prepare(spool_dir)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.feed = ResultFeed(self.journal, loop)
        self.feed.start()

    def close(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        self._scoring.shutdown(wait=False, cancel_futures=True)
        self._lookups.shutdown(wait=False, cancel_futures=True)

    async def _blocking(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # --- Score ----------------------------------------------------------------------------------------

    def admit(self, method: str, terminal: str) -> Refused | None:
        """A terminal's call as it arrives, before its request is read (from the auth interceptor)."""
        if method != SCORE_METHOD:
            return None
        return self._admit_score(terminal)

    def _admit_score(self, terminal: str) -> Refused | None:
        problem = self.hooks.problem()
        if problem:
            return Refused(grpc.StatusCode.UNAVAILABLE, f"Not taking images now: {problem}", "not taking images")
        bucket = self._rates.setdefault(terminal, _TokenBucket(self.limits.score_rate_per_terminal))
        if not bucket.take():
            return Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"More than {self.limits.score_rate_per_terminal:g} Score calls per second from this terminal; "
                "slow down.",
                f"Score rate of {terminal!r}",
            )
        return self._all_running()

    def _all_running(self) -> Refused | None:
        if self._scores < self.limits.max_scores:
            return None
        return Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self.limits.max_scores} Score calls are running; retry.",
            "Score calls all running",
        )

    async def Score(self, request: pb.ScoreRequest, context: aio.ServicerContext[Any, Any]) -> pb.Result:
        who = caller.get(LOCAL)
        if not request.image:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ScoreRequest.image is empty.")
        # Admitted as it arrived: only the count is checked again (others may have started while it was read).
        refused = self._all_running() if who.admitted else self._admit_score(who.name)
        if refused is not None:
            await _abort(context, refused.code, refused.sentence)
        self._scores += 1
        gone = threading.Event()  # the call ended (cancelled, deadline): a waiting thread stops early
        try:
            result = await self._blocking(self._scoring, self._score, request.image, request.file_name, gone.is_set)
            return to_message(result)
        except _Refusal as e:
            await _abort(context, e.code, e.sentence)
        finally:
            gone.set()
            self._scores -= 1

    def _spool(self, data: bytes) -> Path:
        # On the disk before it is journaled: a Score in flight survives a crash or a power cut, as a dropped file does.
        try:
            path = spool.keep(self.spool_dir, "grpc", data, ".bin")
        except OSError as e:
            raise _Refusal(
                grpc.StatusCode.UNAVAILABLE, f"The image could not be stored on the appliance ({e.strerror}); retry."
            ) from e
        return path

    def _score(self, data: bytes, file_name: str, gone: Callable[[], bool]) -> Result:
        digest = digest_bytes(data)
        path = self._spool(data)
        arrival = Arrival(
            source="grpc", path=path, file_name=file_name or "upload", size=len(data), content_hash=digest
        )
        try:
            submitted = self.intake.submit(arrival)
        except (sqlite3.Error, ApplianceError) as e:  # the journal's disk full or damaged: said on health too
            path.unlink(missing_ok=True)
            raise _Refusal(
                grpc.StatusCode.UNAVAILABLE, "The image could not be journaled on the appliance; retry later."
            ) from e
        if submitted.results is None:  # the same content, sent before
            return self._wait_for_input(submitted.duplicate_of or submitted.input_id, gone)
        future = submitted.results
        deadline = time.monotonic() + SCORE_TIMEOUT_S
        try:
            while True:  # in short waits, so a thread whose caller left is free again at once
                try:
                    return future.result(timeout=0.5)[0]
                except FutureTimeout:
                    if gone() or time.monotonic() > deadline:
                        raise _Refusal(
                            grpc.StatusCode.DEADLINE_EXCEEDED, "Scoring took too long; the result will be streamed."
                        ) from None
        except _Refusal:
            raise
        except Exception as e:
            why = (
                e.message
                if isinstance(e, ApplianceError)
                else f"The result could not be stored yet ({type(e).__name__}); it is kept and will be streamed."
            )
            raise _Refusal(grpc.StatusCode.UNAVAILABLE, why) from e

    def _wait_for_input(self, input_id: int, gone: Callable[[], bool]) -> Result:
        """The same content was sent before: answer with its result, waiting if it is still in flight."""
        deadline = time.monotonic() + SCORE_TIMEOUT_S
        while time.monotonic() < deadline and not gone():
            seen = self.journal.last_sequence()  # read first, so a result stored meanwhile wakes the wait
            stored = self.journal.results_for_input(input_id)
            if stored:
                return stored[0].result()
            self.journal.wait_for_results(seen, 0.5)
        raise _Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "The earlier copy of this image is still being scored.")

    # --- StreamResults ----------------------------------------------------------------------------------

    async def StreamResults(
        self, request: pb.StreamResultsRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Yields encoded Results (grpc_server registers this method with a pass-through serializer)."""
        assert self.feed is not None, "bind() runs before the server starts"
        who = caller.get(LOCAL)
        unknown = [k for k in request.kinds if k not in KINDS]
        if unknown:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"StreamResultsRequest.kinds names {unknown[0]}, not a kind this appliance streams: name "
                "RESULT_KIND_IMAGE, RESULT_KIND_SERIES or both.",
            )
        kinds = frozenset(KINDS[k] for k in request.kinds) or IMAGES_ONLY
        until = request.until_sequence
        total = sum(self._streams.values())
        if total >= self.limits.max_streams:
            await _abort(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.limits.max_streams} result streams are open."
            )
        if self._streams[who.name] >= self.limits.max_streams_per_terminal:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"This terminal has {self.limits.max_streams_per_terminal} result streams open already; "
                "close one first.",
            )
        self._streams[who.name] += 1
        self.metrics.streams.inc()
        last = request.since_sequence
        try:
            await context.send_initial_metadata(())  # the terminal knows its stream is open before any result
            while not (until and last >= until):
                messages, through = await self._page(last, kinds, until)
                for data in messages:
                    yield data
                if through == last:
                    await self.feed.wait_past(last, STREAM_WAKE_S)
                last = through
        finally:
            self.metrics.streams.dec()
            self._streams[who.name] -= 1
            if not self._streams[who.name]:
                del self._streams[who.name]

    async def _page(self, last: int, kinds: frozenset[Kind], until: int) -> tuple[list[bytes], int]:
        """What a stream sends next: the messages of its kinds past ``last`` (none past ``until``, where set), from
        at most a page of results read, and the sequence read through (``last`` where none is stored past it).
        The cursor moves over the kinds not sent too, so a series stream resumes past the image results it skipped."""
        assert self.feed is not None
        window = self.feed.after(last)
        if window is None:  # behind the shared window: a page from the journal, encoded only where sent
            rows = await self._blocking(self._lookups, self.journal.results_after, last, PAGE)
            sent = [encoded_stored(r) for r in rows if r.kind in kinds and not (until and r.seq > until)]
            return sent, rows[-1].seq if rows else last
        sent = [p.data for p in window if p.kind in kinds and not (until and p.seq > until)]
        return sent, window[-1].seq if window else last

    # --- lookups ------------------------------------------------------------------------------------

    async def GetResult(self, request: pb.GetResultRequest, context: aio.ServicerContext[Any, Any]) -> pb.Result:
        key = request.WhichOneof("key")
        if key == "sequence" and request.sequence >= 2**63:  # past SQLite's integers: none is stored there
            await _abort(context, grpc.StatusCode.NOT_FOUND, "No result for that sequence.")
        if key == "sequence":
            stored = await self._blocking(self._lookups, self.journal.result_by_seq, request.sequence)
        elif key == "sop_instance_uid":
            stored = await self._blocking(self._lookups, self.journal.result_by_sop_uid, request.sop_instance_uid)
        elif key == "series_instance_uid":
            stored = await self._blocking(self._lookups, self.journal.series_result, request.series_instance_uid)
            if stored is None:
                await _abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    "No series result for that series_instance_uid: none of its images was received, or it is "
                    "still assembling.",
                )
        else:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "Give a sequence, a sop_instance_uid or a series_instance_uid.",
            )
        if stored is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"No result for that {key}.")
        delivery = await self._blocking(self._lookups, self.journal.delivery_of, stored.seq)
        return stored_message(stored, delivery)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.hooks.model_info()])

    async def GetStatus(self, request: pb.GetStatusRequest, context: aio.ServicerContext[Any, Any]) -> pb.Status:
        status: pb.Status = await self._blocking(self._lookups, self._status)
        if self.insecure:  # not a fault (health stays SERVING: a lab chose it), but said wherever one is read
            status.problems.append(INSECURE_PROBLEM)
        return status

    def _status(self) -> pb.Status:
        status = self.hooks.status()
        with contextlib.suppress(sqlite3.Error, ApplianceError):  # a damaged journal: said among the problems
            status.open_series = self.journal.open_series()
        return status

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ReloadModelResponse:
        # On a daemon thread, not an executor's: a reload still loading at shutdown must not hold the exit.
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[pb.ReloadModelResponse] = loop.create_future()

        def reload() -> None:
            try:
                result = self.hooks.reload()
                loop.call_soon_threadsafe(_settle, answer, result, None)
            except BaseException as e:  # handed to the call, which answers with it
                loop.call_soon_threadsafe(_settle, answer, None, e)

        threading.Thread(target=reload, name="reload", daemon=True).start()
        return await answer


async def _abort(context: aio.ServicerContext[Any, Any], code: grpc.StatusCode, sentence: str) -> NoReturn:
    await context.abort(code, sentence)
    raise AssertionError("unreachable: abort raises")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the call was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
