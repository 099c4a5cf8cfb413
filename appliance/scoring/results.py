"""The one result builder: what the batcher gave for each frame of an input becomes its results. The daemon's
finisher and `appliance score` both use it, so an offline score is the daemon's result exactly."""

from __future__ import annotations

import logging
import time
from typing import Any

from appliance.domain.errors import ApplianceError, DecodeTimeout, FileVanished, InferenceFailed, InputRejected
from appliance.domain.manifest import Manifest
from appliance.domain.result import (
    Heatmap,
    ImageIds,
    InputFacts,
    LabelScore,
    Outcome,
    Rejection,
    Result,
    ScoredBy,
    Timings,
)
from appliance.imaging.types import ImageMeta
from appliance.inference.postprocess import Scores, decide
from appliance.journal import payload
from appliance.journal.journal import NewDelivery, NewResult
from appliance.prepare.preparer import Prepared
from appliance.privacy import log_failure
from appliance.scoring.heatmaps import heatmap_of
from appliance.scoring.job import Frame

log = logging.getLogger(__name__)

# Rejections that say nothing about the content: the same bytes sent again are tried again. A busy box can
# time a decode out that a quiet one finishes.
TRANSIENT_CODES = frozenset({FileVanished.code, InferenceFailed.code, ApplianceError.code, DecodeTimeout.code})

Scorer = tuple[Manifest, str]  # the manifest and backend name of the model that ran a batch


def build_results(
    facts: InputFacts, prepared: Prepared | None, frames: list[Frame | None], picked_up: float, current: Scorer
) -> list[Result]:
    """One result per frame. ``current`` names the model for frames no batch ran (rejected before it)."""
    meta = prepared.meta if prepared else None
    total_ms = (time.perf_counter() - picked_up) * 1e3
    out: list[Result] = []
    for index, frame in enumerate(frames):
        assert frame is not None
        row, error, timing = frame
        times = Timings(
            decode_ms=prepared.decode_ms if prepared else 0.0,
            preprocess_ms=prepared.preprocess_ms if prepared else 0.0,
            queue_ms=timing.queue_ms,
            infer_ms=timing.infer_ms,
            total_ms=total_ms,
            batch_size=timing.batch_size,
        )
        # The model that ran this frame's batch (a reload may have swapped another in since).
        scored_by: Scorer = timing.scored_by or current  # type: ignore[assignment]
        manifest, backend_name = scored_by
        if error is None and row is not None:
            try:
                scores = decide(row.scores, manifest)
            except ValueError as e:
                error = InferenceFailed(str(e))
            else:
                heatmap = None if row.heatmap is None else heatmap_of(row.heatmap, row.scores, manifest, meta)
                out.append(scored(facts, manifest, backend_name, meta, scores, times, index, len(frames), heatmap))
                continue
        out.append(rejection(facts, manifest, backend_name, error, times, meta, index, len(frames)))
    return out


def _result(
    facts: InputFacts,
    manifest: Manifest,
    backend_name: str,
    meta: ImageMeta | None,
    times: Timings,
    frame_index: int,
    frame_count: int,
    refused_after_header: ImageIds | None = None,
    **outcome: Any,
) -> Result:
    """What every result holds, scored or not; ``outcome`` says which, and what it found or why not."""
    ids = ImageIds(sop_instance_uid=facts.instance_uid)  # GetResult finds a rejected instance by it too
    if meta is not None:
        ids = ImageIds(meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid, meta.accession_number)
    elif refused_after_header is not None:
        ids = refused_after_header  # what the header of a refused input said
    return Result(
        input=facts,
        scored_by=ScoredBy(manifest.model.name, manifest.model.version, backend_name),
        created_unix_ms=time.time_ns() // 1_000_000,
        timings=times,
        ids=ids,
        frame_index=frame_index,
        frame_count=frame_count,
        **outcome,
    )


def scored(
    facts: InputFacts,
    manifest: Manifest,
    backend_name: str,
    meta: ImageMeta | None,
    scores: Scores,
    times: Timings,
    frame_index: int,
    frame_count: int,
    heatmap: Heatmap | None = None,
) -> Result:
    return _result(
        facts,
        manifest,
        backend_name,
        meta,
        times,
        frame_index,
        frame_count,
        outcome=Outcome.SCORED,
        scores=tuple(LabelScore(lb, v) for lb, v in zip(scores.labels, scores.values, strict=True)),
        decision=scores.verdict,
        findings=scores.findings,
        threshold=scores.threshold,
        heatmap=heatmap,
    )


def rejection(
    facts: InputFacts,
    manifest: Manifest,
    backend_name: str,
    error: BaseException | None,
    times: Timings,
    meta: ImageMeta | None,
    frame_index: int = 0,
    frame_count: int = 1,
) -> Result:
    if error is None:
        error = InferenceFailed("The backend returned no scores for this input.")
    elif isinstance(error, ApplianceError) and not isinstance(error, InputRejected):
        error = InferenceFailed(error.message)  # a backend failure, reported against this input
    elif not isinstance(error, ApplianceError):
        # Unexpected: the sentence names the type only (no data from the file); the trace goes to DEBUG.
        log_failure(log, "input %d: unexpected failure while scoring", facts.input_id, error=error)
        error = ApplianceError(f"Unexpected {type(error).__name__} while scoring; see the daemon's log.")
    return rejected(facts, manifest, backend_name, error, times, meta, frame_index, frame_count)


def rejected(
    facts: InputFacts,
    manifest: Manifest,
    backend_name: str,
    error: ApplianceError,
    times: Timings,
    meta: ImageMeta | None = None,
    frame_index: int = 0,
    frame_count: int = 1,
) -> Result:
    """The result that says why an input was not scored, with the error's own code."""
    rejection = Rejection(error.code, error.message)
    return _result(
        facts,
        manifest,
        backend_name,
        meta,
        times,
        frame_index,
        frame_count,
        refused_after_header=error.ids if isinstance(error, InputRejected) else None,
        outcome=Outcome.REJECTED,
        rejection=rejection,
    )


def journal_row(result: Result, deliveries: tuple[NewDelivery, ...] = ()) -> NewResult:
    """A result as the journal stores it, with the reports that carry it to the PACS: a rejection that says
    nothing about the content is transient."""
    return NewResult(
        frame_index=result.frame_index,
        outcome=result.outcome.value,
        sop_uid=result.ids.sop_instance_uid,
        payload=payload.encode(result),
        transient=result.rejection is not None and result.rejection.code in TRANSIENT_CODES,
        deliveries=deliveries,
    )
