"""The scoring stages wired together: admission → preparation (worker pool) → inference (batcher) →
finishing. The intake enters every input once it is journaled: `submit`, or `submit_rejected` for one refused
before decoding."""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future
from pathlib import Path

from appliance.config import Config
from appliance.domain.errors import InputRejected
from appliance.domain.faults import Faults
from appliance.domain.manifest import Manifest
from appliance.domain.result import InputFacts, Result
from appliance.inference.backend import Backend
from appliance.inference.batcher import Batcher, BatchTiming, Row
from appliance.inference.postprocess import activate
from appliance.journal.journal import Journal
from appliance.prepare.pool import PreparePool, Screened
from appliance.prepare.preparer import Prepared
from appliance.scoring.admission import Admission
from appliance.scoring.finisher import Finisher, ReportMaker
from appliance.scoring.job import Job, Scorer
from appliance.scoring.observer import NoObserver, ScoringObserver

log = logging.getLogger(__name__)


class ScoringStages:
    def __init__(
        self,
        config: Config,
        manifest: Manifest,
        backend: Backend,
        journal: Journal,
        observer: ScoringObserver | None = None,
        faults: Faults | None = None,
        reports: ReportMaker | None = None,
        display_side: int = 0,
    ) -> None:
        """``display_side`` > 0: the preparer keeps each DICOM input's frames as shown (for heatmap overlays)."""
        self.observer = observer or NoObserver()
        self._scorer = Scorer(manifest, backend.name)
        max_batch = backend.max_batch
        workers = config.inference.decode_workers
        self.admission = Admission(max(4 * max_batch, 2 * workers), self.observer.on_in_flight)
        activation = manifest.output.activation
        self.batcher: Batcher[Scorer] = Batcher(
            backend,
            lambda raw: activate(raw, activation),
            max_batch=max_batch,
            max_delay_ms=config.inference.max_delay_ms,
            capacity=4 * max_batch,
            on_batch=self.observer.on_batch,
            coming=self.admission.coming,
            scored_by=self._scorer,
        )
        self._preparing = PreparePool(manifest, config.limits, workers, config.inference.decode_with, display_side)
        self.finisher = Finisher(
            journal,
            config.watch,
            self.admission,
            self.observer,
            lambda: self._scorer,
            faults or Faults(),
            reports,
            config.series.stable_s,
        )

    @property
    def scorer(self) -> Scorer:
        """The model serving now (a reload swaps it between batches)."""
        return self._scorer

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._preparing.warm()
        self.batcher.start()
        self.finisher.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is in flight (up to ``timeout``); anything left stays queued in the journal."""
        if not self.admission.wait_idle(timeout):
            log.warning(
                "stopping with %d inputs still in the stages after %.0f s; they stay queued in the journal "
                "and are scored at the next start",
                self.admission.unfinished(),
                timeout,
            )
        self._preparing.close()
        self.batcher.stop()
        self.finisher.stop()

    def alive(self) -> bool:
        return self.batcher.alive() and self.finisher.alive() and self._preparing.alive()

    def in_flight(self) -> int:
        return self.admission.in_flight()

    def wait_idle(self, timeout: float) -> bool:
        return self.admission.wait_idle(timeout)

    def swap_model(self, manifest: Manifest, backend: Backend, timeout: float = 120.0) -> bool:
        """Score with another model (same input and preprocessing) from the next batch on; what was
        submitted before runs on the old one. The old backend is closed once no batch uses it."""
        activation = manifest.output.activation
        scorer = Scorer(manifest, backend.name)
        old = self.batcher.swap(backend, lambda raw: activate(raw, activation), scorer, timeout)
        if old is None:
            return False
        self._scorer = scorer  # for rejections from now on
        old.close()
        return True

    # --- the ways an input enters ----------------------------------------------------------------------

    def submit(
        self, facts: InputFacts, path: Path, *, screened: Screened | None = None, picked_up: float | None = None
    ) -> Future[list[Result]]:
        """A journaled input: prepare it in the pool (blocking while the stages are full), then on to the
        batcher; the future gets its results. ``screened``: the folder's file as it was hashed (`prepare_file`);
        ``picked_up``: when its way in first saw it (time.perf_counter), for the latency."""
        results: Future[list[Result]] = Future()
        job = Job(facts=facts, path=path, future=results)
        if picked_up is not None:
            job.picked_up = picked_up
        self.admission.admit()
        try:
            preparing = self._preparing.prepare(job.path, facts.file_name, screened, facts.content_hash)
        except BaseException:
            self._drop()
            raise
        preparing.add_done_callback(functools.partial(self._prepared, job))
        return results

    def _drop(self) -> None:
        """An admitted input that goes no further (one the pool cancelled at stop): its slot back."""
        self.admission.arrived()
        self.admission.release()

    def submit_rejected(self, facts: InputFacts, path: Path, error: InputRejected) -> None:
        """Record a rejection decided before any decoding (e.g. a file that keeps crashing the daemon)."""
        self.admission.admit()
        self._reject(Job(facts=facts, path=path), error)

    # --- on through the stages ------------------------------------------------------------------------

    def _prepared(self, job: Job, preparing: Future[Prepared]) -> None:
        if preparing.cancelled():  # stopping: the input stays queued in the journal for the next start
            self._drop()
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
        self.admission.arrived()

    def _frame_done(
        self, job: Job, index: int, row: Row | None, error: BaseException | None, timing: BatchTiming[Scorer]
    ) -> None:
        with job.lock:
            job.frames[index] = (row, error, timing)
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self.finisher.put(job)

    def _reject(self, job: Job, error: BaseException) -> None:
        self.admission.arrived()
        job.frames = [(None, error, BatchTiming(0.0, 0.0, 0))]
        self.finisher.put(job)
