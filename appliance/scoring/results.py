"""The one result builder: what the batcher gave for each frame of an input becomes its results. The daemon's
finisher and `appliance score` both use it, so an offline score is the daemon's result exactly."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from appliance.domain.errors import (
    ApplianceError,
    DecodeTimeout,
    FileRewritten,
    FileVanished,
    InferenceFailed,
    InputRejected,
)
from appliance.domain.result import (
    Heatmap,
    ImageIds,
    InputFacts,
    LabelScore,
    Outcome,
    Rejection,
    Result,
    Timings,
)
from appliance.imaging.types import ImageMeta
from appliance.inference.postprocess import Scores, decide
from appliance.journal import payload
from appliance.journal.journal import NewDelivery, NewResult
from appliance.prepare.preparer import Prepared
from appliance.privacy import log_failure
from appliance.scoring.heatmaps import heatmap_of
from appliance.scoring.job import Frame, Scorer

log = logging.getLogger(__name__)

# Rejections that say nothing about the content: the same bytes sent again are tried again. A busy box can
# time a decode out that a quiet one finishes.
TRANSIENT_CODES = frozenset(
    {FileVanished.code, FileRewritten.code, InferenceFailed.code, ApplianceError.code, DecodeTimeout.code}
)


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
        scorer = current if timing.scored_by is None else timing.scored_by
        if timing.ran_on and timing.ran_on != scorer.backend:  # a remote backend's fallback ran it: say which
            scorer = replace(scorer, backend=timing.ran_on)
        manifest = scorer.manifest
        if error is None and row is not None:
            try:
                scores = decide(row.scores, manifest)
            except ValueError as e:
                error = InferenceFailed(str(e))
            else:
                heatmap = None if row.heatmap is None else heatmap_of(row.heatmap, row.scores, manifest, meta)
                out.append(scored(facts, scorer, meta, scores, times, index, len(frames), heatmap))
                continue
        reported = error_to_report(error, facts.input_id)
        out.append(rejected(facts, scorer, reported, times, meta, index, len(frames)))
    return out


def _result(
    facts: InputFacts,
    scorer: Scorer,
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
        ids = ImageIds(
            meta.study_instance_uid,
            meta.series_instance_uid,
            meta.sop_instance_uid,
            meta.accession_number,
            meta.images_in_acquisition,
        )
    elif refused_after_header is not None:
        ids = refused_after_header  # what the header of a refused input said
    return Result(
        input=facts,
        scored_by=scorer.scored_by,
        created_unix_ms=time.time_ns() // 1_000_000,
        timings=times,
        ids=ids,
        frame_index=frame_index,
        frame_count=frame_count,
        **outcome,
    )


def scored(
    facts: InputFacts,
    scorer: Scorer,
    meta: ImageMeta | None,
    scores: Scores,
    times: Timings,
    frame_index: int,
    frame_count: int,
    heatmap: Heatmap | None = None,
) -> Result:
    """The result of a frame the model scored, with the manifest's decision (``scores``)."""
    return _result(
        facts,
        scorer,
        meta,
        times,
        frame_index,
        frame_count,
        outcome=Outcome.SCORED,
        scores=tuple(LabelScore(lb, v) for lb, v in zip(scores.labels, scores.values, strict=True)),
        decision=scores.decision,
        findings=scores.findings,
        threshold=scores.threshold,
        heatmap=heatmap,
    )


def error_to_report(error: BaseException | None, input_id: int) -> ApplianceError:
    """What stopped a frame on its way to a score (or None: no scores came back), as the error its rejection
    reports: the input's own fault keeps its code, anything else is an inference failure or unexpected."""
    if error is None:
        return InferenceFailed("The backend returned no scores for this input.")
    if isinstance(error, InputRejected):
        return error
    if isinstance(error, ApplianceError):
        return InferenceFailed(error.message)  # a backend failure, reported against this input
    # Unexpected: the sentence names the type only (no data from the file); the trace goes to DEBUG.
    log_failure(log, "input %d: unexpected failure while scoring", input_id, error=error)
    return ApplianceError(f"Unexpected {type(error).__name__} while scoring; see the daemon's log.")


def rejected(
    facts: InputFacts,
    scorer: Scorer,
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
        scorer,
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
