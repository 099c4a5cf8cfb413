"""Runs journaled inputs through the stages: prepare (worker pool) → batcher → finish (journal, disposal)."""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.config import Config
from appliance.errors import (
    ApplianceError,
    CorruptImage,
    DecodeTimeout,
    FileVanished,
    InferenceFailed,
    InputRejected,
    StorageFull,
)
from appliance.faults import STORAGE, Faults
from appliance.imaging.types import ImageMeta
from appliance.inference.backend import Backend
from appliance.inference.batcher import Batcher, BatchTiming
from appliance.inference.postprocess import activate, decide
from appliance.ingest import disposal
from appliance.ingest.journal import Journal, NewResult
from appliance.manifest import Manifest
from appliance.pipeline import Prepared
from appliance.prepare_pool import PreparePool, ReadAhead
from appliance.privacy import hashed, log_failure
from appliance.results import InputFacts, StageTimes, outcome_of, rejected_result, scored_result, stored_to_message
from appliance.server.metrics import Metrics
from appliance.v1 import scoring_pb2 as pb

log = logging.getLogger(__name__)

# Rejections that say nothing about the content: the same bytes dropped again are tried again.
# A busy box can time a decode out that a quiet one finishes: the same content sent again is tried again.
TRANSIENT_CODES = frozenset({FileVanished.code, InferenceFailed.code, ApplianceError.code, DecodeTimeout.code})


@dataclass
class Job:
    """One journaled input on its way through the stages."""

    facts: InputFacts
    path: Path
    picked_up: float = field(default_factory=time.perf_counter)
    future: Future[list[pb.Result]] | None = None  # set for Score calls waiting on the answer
    prepared: Prepared | None = None
    frames: list[tuple[np.ndarray | None, BaseException | None, BatchTiming] | None] = field(default_factory=list)
    remaining: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


FINISH_GROUP = 64  # results stored per journal transaction at most
RETRY_S = 1.0  # how often results held back by a full disk are tried again once it has space


class Processor:
    """Owns the worker pool, the batcher and the finisher thread.

    ``submit`` blocks once ``capacity`` inputs are in flight: a burst of thousands of files waits
    in the folder and the journal, not in memory.

    Results that cannot be stored for want of space are held (with their slots) and stored once
    ``faults`` says the disk has space again: never dropped, never stuck until a restart.
    """

    def __init__(
        self,
        config: Config,
        manifest: Manifest,
        backend: Backend,
        journal: Journal,
        metrics: Metrics,
        faults: Faults | None = None,
    ) -> None:
        self.config = config
        self.manifest = manifest
        self.backend_name = backend.name
        self.journal = journal
        self.metrics = metrics
        self.faults = faults or Faults()
        self._held: list[Job] = []  # finished jobs whose results wait for space; the finisher's own
        self._held_count = 0  # len(_held), read by other threads under _in_flight_lock
        activation = manifest.output.activation
        max_batch = backend.max_batch
        self.batcher = Batcher(
            backend,
            lambda raw: activate(raw, activation),
            max_batch=max_batch,
            max_delay_ms=config.inference.max_delay_ms,
            capacity=4 * max_batch,
            on_batch=metrics.observe_batch,
            coming=lambda: self._on_the_way > 0,
            tag=(manifest, backend.name),
        )
        workers = config.inference.decode_workers
        self._preparing = PreparePool(manifest, config.limits, workers, config.inference.decode_with)
        self._slots = threading.BoundedSemaphore(max(4 * max_batch, 2 * workers))
        self._finish_queue: queue.Queue[Job | None] = queue.Queue()
        self._finisher = threading.Thread(target=self._finish_loop, name="finisher", daemon=True)
        self._in_flight = 0
        self._on_the_way = 0  # admitted inputs not yet at the batcher (or rejected before it)
        self._in_flight_lock = threading.Lock()
        self._idle = threading.Condition(self._in_flight_lock)

    # --- lifecycle ----------------------------------------------------------------------------------

    def swap_model(self, manifest: Manifest, backend: Backend, timeout: float = 120.0) -> bool:
        """Score with another model (same input and preprocessing) from the next batch on; what was
        submitted before runs on the old one. The old backend is closed once no batch uses it."""
        activation = manifest.output.activation
        old = self.batcher.swap(backend, lambda raw: activate(raw, activation), (manifest, backend.name), timeout)
        if old is None:
            return False
        self.manifest, self.backend_name = manifest, backend.name  # for rejections from now on
        old.close()
        return True

    def start(self) -> None:
        self._preparing.warm()
        self.batcher.start()
        self._finisher.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is in flight (up to ``timeout``); anything left stays queued in the journal."""
        if not self.wait_idle(timeout):
            with self._in_flight_lock:
                left = self._in_flight - self._held_count
            log.warning(
                "stopping with %d inputs still in the stages after %.0f s; they stay queued in the journal "
                "and are scored at the next start",
                left,
                timeout,
            )
        self._preparing.close()
        self.batcher.stop()
        if self._finisher.is_alive():  # not started when the daemon's start failed after building it
            self._finish_queue.put(None)
            self._finisher.join(timeout=10)

    def alive(self) -> bool:
        return self.batcher.alive() and self._finisher.is_alive() and self._preparing.alive()

    def in_flight(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight but results waiting for disk space (those can't finish now)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight <= self._held_count, timeout)

    # --- the stages ---------------------------------------------------------------------------------

    def submit(
        self,
        facts: InputFacts,
        path: Path,
        *,
        answer: Future[list[pb.Result]] | None = None,
        picked_up: float | None = None,
    ) -> None:
        """A journaled input: prepare it in the pool, then on to the batcher. ``answer`` gets its results."""
        job = Job(facts=facts, path=path, future=answer)
        if picked_up is not None:
            job.picked_up = picked_up
        self._admit()
        try:
            preparing = self._preparing.prepare(job.path, job.facts.file_name)
        except BaseException:
            self.drop()
            raise
        preparing.add_done_callback(functools.partial(self._prepared, job))

    def read_ahead(self, path: Path, screened: os.stat_result, file_name: str) -> Future[ReadAhead]:
        """A watched file not yet journaled: hash and prepare it in one read. Takes a slot (blocking when
        the stages are full) that ``take`` carries on or ``drop`` gives back."""
        self._admit()
        try:
            return self._preparing.read_ahead(path, screened, file_name)
        except BaseException:
            self.drop()
            raise

    def take(self, facts: InputFacts, path: Path, ahead: ReadAhead, picked_up: float | None = None) -> None:
        """The read-ahead input is now journaled: on to the batcher (or to its rejection). ``picked_up``:
        when the ingest screened it (time.perf_counter)."""
        job = Job(facts=facts, path=path)
        if picked_up is not None:
            job.picked_up = picked_up
        if ahead.prepared is None:
            self._reject(job, ahead.error or CorruptImage())
        else:
            self._start(job, ahead.prepared)

    def drop(self) -> None:
        """An admitted input that goes no further (a read-ahead known, duplicate, changed or failed, or
        one the pool cancelled at stop): its slot back."""
        self._arrived()
        self._release()

    def submit_rejected(self, facts: InputFacts, path: Path, error: InputRejected) -> None:
        """Record a rejection decided before any decoding (e.g. a file that keeps crashing the daemon)."""
        self._admit()
        self._reject(Job(facts=facts, path=path), error)

    def _admit(self) -> None:
        """Take a slot (blocking when the stages are full); ``_release`` gives it back."""
        self._slots.acquire()
        with self._in_flight_lock:
            self._in_flight += 1
            self._on_the_way += 1
            self.metrics.in_flight.set(self._in_flight)

    def _prepared(self, job: Job, preparing: Future[Prepared]) -> None:
        if preparing.cancelled():  # stopping: the input stays queued in the journal for the next start
            self.drop()
            return
        try:
            prepared = preparing.result()
        except Exception as e:  # the per-input error boundary: any failure rejects this input only
            self._reject(job, e)
            return
        self._start(job, prepared)

    def _start(self, job: Job, prepared: Prepared) -> None:
        job.prepared = prepared
        tensors = prepared.tensors
        job.frames = [None] * len(tensors)
        job.remaining = len(tensors)
        for index, tensor in enumerate(tensors):
            self.batcher.submit(tensor, functools.partial(self._frame_done, job, index))
        self._arrived()

    def _arrived(self) -> None:
        with self._in_flight_lock:
            self._on_the_way -= 1

    def _frame_done(
        self,
        job: Job,
        index: int,
        scores: np.ndarray | None,
        error: BaseException | None,
        timing: BatchTiming,
    ) -> None:
        with job.lock:
            job.frames[index] = (scores, error, timing)
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self._finish_queue.put(job)

    def _reject(self, job: Job, error: BaseException) -> None:
        self._arrived()
        job.frames = [(None, error, BatchTiming(0.0, 0.0, 0))]
        self._finish_queue.put(job)

    def _finish_loop(self) -> None:
        """Store results in groups: whatever finished while the last group was being written goes into
        the next one transaction, so a burst costs one fsync per group, not per file. Results held back
        by a full disk go first into the next group once it has space (checked every RETRY_S)."""
        stopping = False
        while not stopping:
            try:
                job = self._finish_queue.get(timeout=RETRY_S if self._held else None)
            except queue.Empty:
                job = None
                if self.faults.holds(STORAGE):
                    continue
            else:
                if job is None:
                    break
            group = [job] if job is not None else []
            while len(group) < FINISH_GROUP:
                try:
                    more = self._finish_queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                group.append(more)
            if self._held and not self.faults.holds(STORAGE):
                group = self._held + group
                self._set_held([])
            if group:
                self._store(group)
        self._abandon_held()

    def _store(self, group: list[Job]) -> None:
        held: list[Job] = []
        try:
            held = self._finish_group(group)
        except Exception as e:  # never lose the finisher: fail the callers still waiting, keep going
            for failed in group:
                if failed.future is None or not failed.future.done():
                    self._fail(failed, e)
        finally:
            kept = {id(job) for job in held}
            for job in group:
                if id(job) not in kept:
                    self._release()
        if held:
            self._set_held(self._held + held)

    def _set_held(self, held: list[Job]) -> None:
        self._held = held
        with self._in_flight_lock:
            self._held_count = len(held)
            self._idle.notify_all()

    def _abandon_held(self) -> None:
        """Stopping with results that found no space: their inputs stay queued for the next start."""
        if not self._held:
            return
        log.warning(
            "stopping with %d results not stored for want of disk space; their inputs stay queued in the "
            "journal and are scored at the next start",
            len(self._held),
        )
        held, self._held = self._held, []
        for _ in held:
            self._release()
        self._set_held([])

    def _release(self) -> None:
        self._slots.release()
        with self._in_flight_lock:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
            if self._in_flight == 0:
                self._idle.notify_all()

    def _finish_group(self, group: list[Job]) -> list[Job]:
        """One transaction for the group's results; a job that fails fails alone. Returns the jobs whose
        results found no disk space: they are held and stored later."""
        built: list[tuple[Job, list[pb.Result], list[NewResult]]] = []
        for job in group:
            try:
                results = self._build_results(job)
                built.append((job, results, [self._row(r) for r in results]))
            except Exception as e:
                self._fail(job, e)
        held: list[Job] = []
        try:
            stored: list[list[int] | None] = list(
                self.journal.complete_many([(job.facts.input_id, rows) for job, _, rows in built])
            )
        except Exception as e:
            if self.faults.report(e):  # the disk is full: the whole group waits for space
                for job, _, _ in built:
                    self._hold(job)
                return [job for job, _, _ in built]
            # One input's rows must not hold back the others': store them one at a time instead.
            stored = []
            for job, _, rows in built:
                try:
                    stored.append(self.journal.complete(job.facts.input_id, rows))
                except Exception as e:
                    if self.faults.report(e):
                        self._hold(job)
                        held.append(job)
                    else:
                        self._fail(job, e)
                    stored.append(None)
        disposed: list[tuple[int, str]] = []
        done: list[tuple[Job, list[pb.Result]]] = []
        for (job, results, _), seqs in zip(built, stored, strict=True):
            if seqs is None:
                continue
            try:
                if not seqs:
                    # Already finished by another job for the same input: answer with what is stored.
                    log.warning("input %d was already finished; this second run stored nothing", job.facts.input_id)
                    if job.future is not None and not job.future.done():
                        earlier = self.journal.results_for_input(job.facts.input_id)
                        job.future.set_result([stored_to_message(s) for s in earlier])
                    continue
                for r, seq in zip(results, seqs, strict=True):
                    r.sequence = seq
                where = self._dispose(job, results[0])
                if where is not None:
                    disposed.append((job.facts.input_id, where))
                done.append((job, results))
            except Exception as e:
                self._fail(job, e)
        try:
            self.journal.set_disposed_many(disposed)
        except Exception as e:  # the files are moved and the results stored; a rescan records the rest
            if not self.faults.report(e):
                log_failure(log, "recording where %d files went failed", len(disposed), error=e)
        for job, results in done:
            self._account(job, results)
            if job.future is not None and not job.future.done():
                job.future.set_result(results)
        return held

    def _hold(self, job: Job) -> None:
        """A result that found no space is kept for a retry; a Score call waiting on it is answered now
        (it is still stored and streamed once the disk has space)."""
        log.debug("input %d: its result waits for disk space", job.facts.input_id)
        if job.future is not None and not job.future.done():
            job.future.set_exception(StorageFull())

    @staticmethod
    def _row(r: pb.Result) -> NewResult:
        return NewResult(
            frame_index=r.frame_index,
            outcome="scored" if r.outcome == pb.OUTCOME_SCORED else "rejected",
            sop_uid=r.sop_instance_uid,
            payload=r.SerializeToString(),
            transient=r.rejection.code in TRANSIENT_CODES,
        )

    def _fail(self, job: Job, error: BaseException) -> None:
        log_failure(log, "input %d: storing its result failed", job.facts.input_id, error=error)
        if job.future is not None and not job.future.done():
            job.future.set_exception(error)

    def _build_results(self, job: Job) -> list[pb.Result]:
        prepared = job.prepared
        meta = prepared.meta if prepared else None
        total_ms = (time.perf_counter() - job.picked_up) * 1e3
        out: list[pb.Result] = []
        for index, frame in enumerate(job.frames):
            assert frame is not None
            scores, error, timing = frame
            times = StageTimes(
                decode_ms=prepared.decode_ms if prepared else 0.0,
                preprocess_ms=prepared.preprocess_ms if prepared else 0.0,
                queue_ms=timing.queue_ms,
                infer_ms=timing.infer_ms,
                total_ms=total_ms,
                batch_size=timing.batch_size,
            )
            if error is not None or scores is None:
                out.append(self._rejection(job, error, times, meta, index, len(job.frames)))
                continue
            # The model that ran this frame's batch (a reload may have swapped another in since).
            scored_by: tuple[Manifest, str] = timing.scored_by or (self.manifest, self.backend_name)  # type: ignore[assignment]
            manifest, backend_name = scored_by
            try:
                decision = decide(scores, manifest)
            except ValueError as e:
                out.append(self._rejection(job, InferenceFailed(str(e)), times, meta, index, len(job.frames)))
                continue
            out.append(
                scored_result(
                    job.facts,
                    manifest,
                    backend_name,
                    meta or ImageMeta(source_format=""),
                    decision,
                    times,
                    frame_index=index,
                    frame_count=len(job.frames),
                )
            )
        return out

    def _rejection(
        self,
        job: Job,
        error: BaseException | None,
        times: StageTimes,
        meta: ImageMeta | None,
        frame_index: int = 0,
        frame_count: int = 1,
    ) -> pb.Result:
        if error is None:
            error = InferenceFailed("The backend returned no scores for this input.")
        elif isinstance(error, ApplianceError) and not isinstance(error, InputRejected):
            error = InferenceFailed(error.message)  # a backend failure, reported against this input
        elif not isinstance(error, ApplianceError):
            # Unexpected: the sentence names the type only (no data from the file); the trace goes to DEBUG.
            log_failure(log, "input %d: unexpected failure while scoring", job.facts.input_id, error=error)
            error = ApplianceError(f"Unexpected {type(error).__name__} while scoring; see the daemon's log.")
        result = rejected_result(job.facts, self.manifest, self.backend_name, error, times, meta)
        result.frame_index, result.frame_count = frame_index, frame_count
        return result

    def _dispose(self, job: Job, first: pb.Result) -> str | None:
        """Move the file aside; returns where it went ('' for gone), None if the move failed."""
        try:
            return disposal.dispose(
                job.path, job.facts.input_id, job.facts.source, outcome_of(first), self.config.watch
            )
        except OSError as e:  # the result is stored; a failed move is retried by the next rescan
            if not self.faults.report(e):
                log.warning("input %d: could not move the file aside: %s", job.facts.input_id, e.strerror)
            return None

    def _account(self, job: Job, results: list[pb.Result]) -> None:
        elapsed = time.perf_counter() - job.picked_up
        self.metrics.latency.observe(elapsed)
        for r in results:
            if r.outcome == pb.OUTCOME_SCORED:
                self.metrics.results.labels("scored", "").inc()
                log.info(
                    "input %d frame %d scored: seq=%d decision=%s findings=%s sop=%s %.0f ms",
                    job.facts.input_id,
                    r.frame_index,
                    r.sequence,
                    pb.Decision.Name(r.decision).removeprefix("DECISION_").lower(),
                    ",".join(r.findings),
                    hashed(r.sop_instance_uid),
                    elapsed * 1e3,
                )
            else:
                self.metrics.results.labels("rejected", r.rejection.code).inc()
                log.warning(
                    "input %d rejected: seq=%d code=%s reason=%s content=%s",
                    job.facts.input_id,
                    r.sequence,
                    r.rejection.code,
                    r.rejection.message,
                    job.facts.content_hash[:16],
                )
        if job.prepared:
            self.metrics.stage.labels("decode").observe(job.prepared.decode_ms / 1e3)
            self.metrics.stage.labels("preprocess").observe(job.prepared.preprocess_ms / 1e3)
