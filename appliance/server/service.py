"""The `appliance.v1.Scoring` gRPC service: score, stream (resumable), look up, describe."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import grpc

from appliance.ingest.content_hash import digest_bytes
from appliance.ingest.journal import Journal
from appliance.processing import Job, Processor
from appliance.results import InputFacts, stored_to_message
from appliance.server.metrics import Metrics
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STREAM_WAKE_S = 0.5  # how often an idle stream checks that its client is still there
# Each open stream holds one server thread; past this many, new ones are refused so that Score,
# GetStatus and health checks always find a free thread.
MAX_STREAMS = 48
# Score calls wait for their result, holding a thread too; with the streams this leaves threads for
# health checks and GetStatus (see grpc_server.MAX_WORKERS).
MAX_SCORES = 8
SCORE_TIMEOUT_S = 120.0


class ScoringService(pb_grpc.ScoringServicer):
    def __init__(
        self,
        journal: Journal,
        processor: Processor,
        spool_dir: Path,
        model_info: pb.ModelInfo,
        status: Callable[[], pb.Status],
        metrics: Metrics,
    ) -> None:
        self.journal = journal
        self.processor = processor
        self.spool_dir = spool_dir
        self.model_info = model_info
        self.status = status
        self.metrics = metrics
        self._streams = 0
        self._streams_lock = threading.Lock()
        self._score_slots = threading.BoundedSemaphore(MAX_SCORES)
        spool_dir.mkdir(parents=True, exist_ok=True)

    def _spool(self, data: bytes) -> Path:
        # Written durably before it is journaled, so a Score in flight survives a crash like a dropped file.
        path = self.spool_dir / f"{uuid.uuid4().hex}.bin"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.Result:
        if not request.image:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ScoreRequest.image is empty.")
        if not self._score_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_SCORES} Score calls are running; try again.")
        try:
            return self._score(request, context)
        finally:
            self._score_slots.release()

    def _score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.Result:
        data = request.image
        digest = digest_bytes(data)
        path = self._spool(data)
        reg = self.journal.register(
            source="grpc",
            path=str(path),
            file_name=request.file_name or "upload",
            size=len(data),
            mtime_ns=0,
            content_hash=digest,
        )
        if reg.duplicate_of is not None:
            path.unlink(missing_ok=True)
            self.metrics.duplicates.inc()
            return self._wait_for_input(reg.duplicate_of.id, context)
        future: Future[list[pb.Result]] = Future()
        facts = InputFacts(input_id=reg.input.id, source="grpc", file_name=reg.input.file_name, content_hash=digest)
        self.processor.submit(Job(facts=facts, path=path, future=future))
        try:
            return future.result(timeout=SCORE_TIMEOUT_S)[0]
        except FutureTimeout:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Scoring took too long; the result will be streamed.")
        except Exception as e:
            context.abort(grpc.StatusCode.INTERNAL, f"Storing the result failed: {type(e).__name__}.")
        raise AssertionError("unreachable: context.abort raises")

    def _wait_for_input(self, input_id: int, context: grpc.ServicerContext) -> pb.Result:
        """The same content was sent before: answer with its result, waiting if it is still in flight."""
        for _ in range(int(SCORE_TIMEOUT_S / STREAM_WAKE_S)):
            seen = self.journal.last_sequence()  # read first, so a result stored meanwhile wakes the wait
            stored = self.journal.results_for_input(input_id)
            if stored:
                return stored_to_message(stored[0])
            if not context.is_active():
                break
            self.journal.wait_for_results(seen, STREAM_WAKE_S)
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "The earlier copy of this image is still being scored.")
        raise AssertionError("unreachable")

    def StreamResults(self, request: pb.StreamResultsRequest, context: grpc.ServicerContext) -> Iterator[pb.Result]:
        last = request.since_sequence
        with self._streams_lock:
            if self._streams >= MAX_STREAMS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_STREAMS} result streams are open already.")
            self._streams += 1
        self.metrics.streams.inc()
        try:
            while context.is_active():
                batch = self.journal.results_after(last)
                for stored in batch:
                    yield stored_to_message(stored)
                    last = stored.seq
                if not batch:
                    self.journal.wait_for_results(last, STREAM_WAKE_S)
        finally:
            self.metrics.streams.dec()
            with self._streams_lock:
                self._streams -= 1

    def GetResult(self, request: pb.GetResultRequest, context: grpc.ServicerContext) -> pb.Result:
        key = request.WhichOneof("key")
        if key == "sequence":
            stored = self.journal.result_by_seq(request.sequence)
        elif key == "sop_instance_uid":
            stored = self.journal.result_by_sop_uid(request.sop_instance_uid)
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Give a sequence or a sop_instance_uid.")
        if stored is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No result for that {key}.")
        return stored_to_message(stored)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.model_info])

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.Status:
        return self.status()
