"""Finishing: results are built, stored in groups (one transaction, one fsync per group), the files moved
aside, and what happened reported to the observer and the log. Results that cannot be stored for want of
space are held (with their slots) and stored once the disk has space again: never dropped, never stuck
until a restart."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from appliance.config import WatchConfig
from appliance.domain.errors import StorageFull
from appliance.domain.faults import STORAGE, Faults
from appliance.domain.manifest import Manifest
from appliance.domain.result import Outcome, Result
from appliance.domain.series import among_best, key_floors
from appliance.files import disposal
from appliance.journal.journal import Journal, NewDelivery, NewResult, SeriesEntry
from appliance.privacy import hashed, log_failure
from appliance.scheduling import lower_this_thread
from appliance.scoring.admission import Admission
from appliance.scoring.job import Job, Scorer
from appliance.scoring.observer import ScoringObserver
from appliance.scoring.results import TRANSIENT_CODES, build_results, journal_row
from appliance.scoring.series import entry_for

log = logging.getLogger(__name__)

FINISH_GROUP = 64  # results stored per journal transaction at most
RETRY_S = 1.0  # how often results held back by a full disk are tried again once it has space


class ReportMaker(Protocol):
    """What goes to the PACS with a stored result (appliance.delivery.reports.Reports)."""

    def for_input(
        self, input_id: int, path: Path, results: list[Result], manifest: Manifest, display: Sequence[np.ndarray]
    ) -> list[tuple[NewDelivery, ...]]: ...

    def key_material(
        self, input_id: int, path: Path, result: Result, display: np.ndarray | None
    ) -> tuple[bytes, bytes | None] | None:
        """What a scored image that may become a key image of its series must keep for the PACS objects."""


@dataclass(frozen=True)
class _Built:
    """A job's results, and the rows that store them."""

    job: Job
    results: list[Result]
    rows: list[NewResult]


class Finisher:
    def __init__(
        self,
        journal: Journal,
        watch: WatchConfig,
        admission: Admission,
        observer: ScoringObserver,
        current: Callable[[], Scorer],
        faults: Faults,
        reports: ReportMaker | None = None,
        series_stable_s: float = 30.0,
    ) -> None:
        self.journal = journal
        self.series_stable_s = series_stable_s  # DICOM images join their series, due this long after the last
        self.reports = reports  # set when results go to a PACS: their reports are stored with them
        self.watch = watch
        self.admission = admission
        self.observer = observer
        self.current = current  # the model serving now, for inputs rejected before any batch
        self.faults = faults
        self._held: list[Job] = []  # finished jobs whose results wait for space; this thread's own
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._finish_loop, name="finisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, job: Job) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        if self._thread.is_alive():  # not started when the daemon's start failed after building it
            self._queue.put(None)
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _finish_loop(self) -> None:
        """Store results in groups: whatever finished while the last group was being written goes into
        the next one transaction, so a burst costs one fsync per group, not per file. Results held back
        by a full disk go first into the next group once it has space (checked every RETRY_S)."""
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        stopping = False
        while not stopping:
            try:
                job = self._queue.get(timeout=RETRY_S if self._held else None)
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
                    more = self._queue.get_nowait()
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
                self._finish(group)
        self._abandon_held()

    def _finish(self, group: list[Job]) -> None:
        """The group finished whatever fails: its callers answered, its slots given back but for those held."""
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
                    self.admission.release()
        if held:
            self._set_held(self._held + held)

    def _set_held(self, held: list[Job]) -> None:
        self._held = held
        self.admission.set_held(len(held))

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
            self.admission.release()
        self._set_held([])

    def _finish_group(self, group: list[Job]) -> list[Job]:
        """One transaction for the group's results; a job that fails fails alone. Returns the jobs whose
        results found no disk space: they are held and stored later."""
        built = self._build(group)
        stored, held = self._store(built)
        self._answer(self._dispose(built, stored))
        return held

    def _build(self, group: list[Job]) -> list[_Built]:
        """Each job's results, and their rows as the journal stores them (with their reports to the PACS)."""
        built: list[_Built] = []
        candidates: dict[tuple[str, str], list[Mapping[str, float]]] = {}  # per series, as the group adds images
        for job in group:
            try:
                current = self.current()
                results = build_results(job.facts, job.prepared, job.frames, job.picked_up, current)
                reports = self._reports(job, results, current.manifest)
                seen = dict(candidates)  # the job's images count once its rows are built
                rows = [
                    replace(journal_row(r, d), series=self._series_entry(job, r, current.manifest, seen))
                    for r, d in zip(results, reports, strict=True)
                ]
                built.append(_Built(job, results, rows))
                candidates.update(seen)
            except Exception as e:
                self._fail(job, e)
        return built

    def _store(self, built: list[_Built]) -> tuple[list[list[int] | None], list[Job]]:
        """The rows in one transaction; where it fails, each input's alone, so one input's rows hold back no
        other's. Returns each job's sequence numbers (None: not stored), and the jobs held for want of space:
        all of them where the group's transaction found the disk full."""
        try:
            return list(self.journal.complete_many([(b.job.facts.input_id, b.rows) for b in built])), []
        except Exception as e:
            if self.faults.report(e):  # the disk is full: the whole group waits for space
                for b in built:
                    self._hold(b.job)
                return [None] * len(built), [b.job for b in built]
        stored: list[list[int] | None] = []
        held: list[Job] = []
        for b in built:
            try:
                stored.append(self.journal.complete(b.job.facts.input_id, b.rows))
            except Exception as e:
                if self.faults.report(e):
                    self._hold(b.job)
                    held.append(b.job)
                else:
                    self._fail(b.job, e)
                stored.append(None)
        return stored, held

    def _dispose(self, built: list[_Built], stored: list[list[int] | None]) -> list[tuple[Job, list[Result]]]:
        """Move each stored input's file aside, and record where in one transaction. Returns the jobs to answer,
        with their results numbered. A job already finished by another (the same input) is answered here with
        what is stored."""
        disposed: list[tuple[int, str]] = []
        done: list[tuple[Job, list[Result]]] = []
        for b, seqs in zip(built, stored, strict=True):
            if seqs is None:
                continue
            job = b.job
            try:
                if not seqs:
                    log.warning("input %d was already finished; this second run stored nothing", job.facts.input_id)
                    if job.future is not None and not job.future.done():
                        earlier = self.journal.results_for_input(job.facts.input_id)
                        job.future.set_result([s.result() for s in earlier])
                    continue
                results = [replace(r, sequence=seq) for r, seq in zip(b.results, seqs, strict=True)]
                where = self._move_aside(job, results[0])
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
        return done

    def _answer(self, done: list[tuple[Job, list[Result]]]) -> None:
        """Count and log each stored result, and answer the Score call waiting on it."""
        for job, results in done:
            self._account(job, results)
            if job.future is not None and not job.future.done():
                job.future.set_result(results)

    def _series_entry(
        self,
        job: Job,
        result: Result,
        manifest: Manifest,
        candidates: dict[tuple[str, str], list[Mapping[str, float]]],
    ) -> SeriesEntry | None:
        """Its place in its series; a rejection that says nothing of the image (retried) takes none.
        ``candidates``: the series' key candidates so far, the group's images not yet stored included, so that
        the frames of a multi-frame instance keep material only where they may become key images."""
        ids = result.ids
        if not (ids.study_instance_uid and ids.series_instance_uid):
            return None  # not a DICOM image of a series: its result stands alone
        if result.rejection is not None and result.rejection.code in TRANSIENT_CODES:
            return None
        reports = self.reports
        material = None
        if reports is not None:
            display = job.prepared.display if job.prepared else ()
            frame = display[result.frame_index] if result.frame_index < len(display) else None
            material = partial(reports.key_material, job.facts.input_id, job.path, result, frame)
        key = (ids.study_instance_uid, ids.series_instance_uid)
        if key not in candidates:
            candidates[key] = list(self.journal.key_scores(*key))
        kept = manifest.series.kept
        entry = entry_for(result, manifest, self.series_stable_s, material, key_floors(candidates[key], kept))
        if entry is not None and entry.scores is not None:
            candidates[key] = among_best([*candidates[key], entry.scores], kept)
        return entry

    def _reports(self, job: Job, results: list[Result], manifest: Manifest) -> list[tuple[NewDelivery, ...]]:
        if self.reports is None:
            return [() for _ in results]
        display = job.prepared.display if job.prepared else ()  # the frames as shown, for heatmap overlays
        return self.reports.for_input(job.facts.input_id, job.path, results, manifest, display)

    def _hold(self, job: Job) -> None:
        """A result that found no space is kept for a retry; a Score call waiting on it is answered now
        (it is still stored and streamed once the disk has space)."""
        log.debug("input %d: its result waits for disk space", job.facts.input_id)
        if job.future is not None and not job.future.done():
            job.future.set_exception(StorageFull())

    def _fail(self, job: Job, error: BaseException) -> None:
        log_failure(log, "input %d: storing its result failed", job.facts.input_id, error=error)
        if job.future is not None and not job.future.done():
            job.future.set_exception(error)

    def _move_aside(self, job: Job, first: Result) -> str | None:
        """Move the file aside; returns where it went ('' for gone), None if the move failed."""
        try:
            return disposal.dispose(job.path, job.facts.input_id, job.facts.source, first, self.watch)
        except OSError as e:  # the result is stored; a failed move is retried by the next rescan
            if not self.faults.report(e):
                log.warning("input %d: could not move the file aside: %s", job.facts.input_id, e.strerror)
            return None

    def _account(self, job: Job, results: list[Result]) -> None:
        elapsed = time.perf_counter() - job.picked_up
        prepared = job.prepared
        self.observer.on_finished(
            elapsed, prepared.decode_ms if prepared else None, prepared.preprocess_ms if prepared else None
        )
        for r in results:
            if r.outcome is Outcome.SCORED and r.decision is not None:
                self.observer.on_result("scored", "")
                log.info(
                    "input %d frame %d scored: seq=%d decision=%s findings=%s sop=%s %.0f ms",
                    job.facts.input_id,
                    r.frame_index,
                    r.sequence,
                    r.decision.value,
                    ",".join(r.findings),
                    hashed(r.ids.sop_instance_uid),
                    elapsed * 1e3,
                )
            else:
                assert r.rejection is not None
                self.observer.on_result("rejected", r.rejection.code)
                log.warning(
                    "input %d rejected: seq=%d code=%s reason=%s content=%s",
                    job.facts.input_id,
                    r.sequence,
                    r.rejection.code,
                    r.rejection.message,
                    job.facts.content_hash[:16],
                )
