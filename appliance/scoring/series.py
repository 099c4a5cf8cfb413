"""Series assembly: each DICOM image's result joins its series as it is stored (finisher.py, same transaction);
this thread completes each series once it is due (quiet for `series.stable_s`, or its header said all are in),
combining its images' scores as the manifest's [series] says, and stores the series result with its objects for the
PACS in one transaction. A late image opens the series again; its next result revises the one that stood."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np

from appliance.domain.manifest import Manifest
from appliance.domain.result import Decision, Outcome, Result
from appliance.domain.series import Completion, ImageScores, SeriesResult, key_images, key_label, per_label
from appliance.inference.postprocess import decide
from appliance.journal import payload
from appliance.journal.journal import Journal, KeyCandidate, NewDelivery, SeriesEntry, SeriesState
from appliance.privacy import hashed, log_failure
from appliance.scheduling import lower_this_thread
from appliance.scoring.job import Scorer

log = logging.getLogger(__name__)

RETRY_S = 60.0  # a series whose result could not be made is tried again this much later
IDLE_S = 5.0  # the longest sleep: a clock change or a missed wake costs no more


class SeriesReportMaker(Protocol):
    """What goes to the PACS with a series result (appliance.delivery.reports.Reports)."""

    def for_series(
        self, result: SeriesResult, keys: Sequence[KeyCandidate], manifest: Manifest
    ) -> tuple[NewDelivery, ...]: ...


class SeriesObserver(Protocol):
    def on_series(self, decision: str, revision: int) -> None: ...


def entry_for(
    result: Result,
    manifest: Manifest,
    stable_s: float,
    material: Callable[[], tuple[bytes, bytes | None] | None] | None,
    floors: Mapping[str, float],
) -> SeriesEntry | None:
    """Where ``result`` goes in its series: None for an input without a series (PNG, JPEG, a DICOM without UIDs).
    ``material`` is asked only where the image beats a floor (``floors``: domain.series.key_floors of the series'
    key candidates) and may become a key image."""
    ids = result.ids
    if not (ids.study_instance_uid and ids.series_instance_uid):
        return None
    # A multi-frame instance is its series' images: all in once its frames are; else Images in Acquisition.
    expected = result.frame_count if result.frame_count > 1 else ids.images_in_acquisition
    scores = None
    kept_material = None
    if result.outcome is Outcome.SCORED:
        scores = {s.label: s.score for s in result.scores}
        if material is not None and any(v > floors.get(label, float("-inf")) for label, v in scores.items()):
            kept_material = material()
    return SeriesEntry(
        study_uid=ids.study_instance_uid,
        series_uid=ids.series_instance_uid,
        accession=ids.accession_number,
        stable_ms=round(stable_s * 1000),
        expected=expected,
        scores=scores,
        kept=manifest.series.kept,
        material=kept_material,
    )


def combine(state: SeriesState, scorer: Scorer, now_ms: int) -> SeriesResult:
    """The series result of ``state``'s images, by ``scorer``'s manifest (its [series] and decision rule)."""
    manifest = scorer.manifest
    rule = manifest.series
    labels = manifest.output.labels
    images = [
        ImageScores(c.image.sequence, c.image.ids.sop_instance_uid, c.image.frame_index, _scores(c.image, labels))
        for c in state.candidates
    ]
    scores = per_label(images, labels, rule.combine, rule.k)
    decided = decide(np.array([s.score for s in scores]), manifest)
    label = key_label(scores, decided.findings, manifest.decision.negative_labels)
    if state.scored == 0:  # every image rejected: nothing was looked at, so nothing can be called absent
        decided = replace(decided, decision=Decision.INDETERMINATE, findings=())
        label = ""
    live = state.live.series() if state.live is not None else None
    return SeriesResult(
        study_instance_uid=state.study_uid,
        series_instance_uid=state.series_uid,
        accession_number=state.accession,
        images_scored=state.scored,
        images_rejected=state.rejected,
        scores=scores,
        decision=decided.decision,
        findings=decided.findings,
        threshold=decided.threshold,
        key_label=label,
        key_images=key_images(images, label, rule.key_images) if label else (),
        scored_by=scorer.scored_by,
        combine=rule.describe(),
        completion=Completion(state.completion),
        revision=state.revision + 1,
        created_unix_ms=now_ms,
        first_image_unix_ms=state.first_ms,
        last_image_unix_ms=state.last_ms,
        revises_sequence=live.sequence if live else 0,
        revises_report_uid=live.report_uid if live else "",
    )


def _scores(image: Result, labels: Sequence[str]) -> dict[str, float]:
    # An image scored by another model version (a reload mid-series) may lack a label: it counts as 0 there.
    given = {s.label: s.score for s in image.scores}
    return {label: given.get(label, 0.0) for label in labels}


class SeriesAssembler:
    def __init__(
        self,
        journal: Journal,
        stable_s: float,
        current: Callable[[], Scorer],
        reports: SeriesReportMaker | None,
        observer: SeriesObserver | None = None,
    ) -> None:
        self.journal = journal
        self.stable_ms = round(stable_s * 1000)
        self.current = current
        self.reports = reports
        self.observer = observer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="series", daemon=True)

    def start(self) -> None:
        waiting = self.journal.restart_series_clocks(_now_ms(), self.stable_ms)
        if waiting:
            log.info("%d series were open at the start; each waits %.0f s again", waiting, self.stable_ms / 1000)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.journal.changed:
            self.journal.changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def complete_due(self) -> int:
        """Complete every series due now; returns how many results were stored."""
        stored = 0
        for series_id in self.journal.series_due(_now_ms()):
            if self._stop.is_set():
                break
            stored += self._complete(series_id)
        return stored

    def _loop(self) -> None:
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        while not self._stop.is_set():
            try:
                self.complete_due()
                self._sleep()
            except Exception as e:  # never lose the thread: a journal that failed now (a full disk) may answer later
                log_failure(log, "series assembly failed; tried again in %.0f s", IDLE_S, error=e)
                self._stop.wait(IDLE_S)

    def _sleep(self) -> None:
        """Until the next series is due, or a result is stored (an image may make its series due at once)."""
        due = self.journal.next_series_due_ms()
        wait = IDLE_S if due is None else min(IDLE_S, max(0.0, (due - _now_ms()) / 1000))
        if wait <= 0 or self._stop.is_set():
            return
        with self.journal.changed:
            self.journal.changed.wait(wait)

    def _complete(self, series_id: int) -> int:
        state = None
        try:
            state = self.journal.series_state(series_id)
            if state is None or state.state != "open":
                return 0
            scorer = self.current()
            result = combine(state, scorer, _now_ms())
            deliveries = self.reports.for_series(result, state.candidates, scorer.manifest) if self.reports else ()
            if deliveries:
                result = replace(result, report_uid=deliveries[0].sop_instance_uid)  # its SR comes first
            seq = self.journal.complete_series(state, payload.encode_series(result), deliveries)
        except Exception as e:  # a damaged row or a full disk: the other series due go on, this one waits
            log_failure(
                log, "series %d: its result could not be made; tried again in %.0f s", series_id, RETRY_S, error=e
            )
            self.journal.postpone_series(series_id, _now_ms() + round(RETRY_S * 1000), state)
            return 0
        if seq is None:
            return 0  # an image came meanwhile: due again after its quiet period
        log.info(
            "series %d complete (%s): seq=%d revision=%d decision=%s images=%d scored, %d rejected key=%s series=%s "
            "%d objects for the PACS",
            series_id,
            result.completion.value,
            seq,
            result.revision,
            result.decision.value,
            result.images_scored,
            result.images_rejected,
            result.key_label,
            hashed(result.series_instance_uid),
            len(deliveries),
        )
        if self.observer is not None:
            self.observer.on_series(result.decision.value, result.revision)
        return 1


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
