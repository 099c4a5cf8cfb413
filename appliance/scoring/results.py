"""The one result builder: what the batcher gave for each frame of an input becomes its results. The daemon's
finisher and `appliance score` both use it, so an offline score is the daemon's result exactly."""

from __future__ import annotations

import logging
import time

from appliance.api.codec import InputFacts, StageTimes, rejected_result, scored_result
from appliance.domain.errors import ApplianceError, DecodeTimeout, FileVanished, InferenceFailed, InputRejected
from appliance.domain.manifest import Manifest
from appliance.imaging.types import ImageMeta
from appliance.inference.postprocess import decide
from appliance.journal.journal import NewResult
from appliance.prepare.preparer import Prepared
from appliance.privacy import log_failure
from appliance.scoring.job import Frame
from appliance.v1 import scoring_pb2 as pb

log = logging.getLogger(__name__)

# Rejections that say nothing about the content: the same bytes sent again are tried again. A busy box can
# time a decode out that a quiet one finishes.
TRANSIENT_CODES = frozenset({FileVanished.code, InferenceFailed.code, ApplianceError.code, DecodeTimeout.code})

Scorer = tuple[Manifest, str]  # the manifest and backend name of the model that ran a batch


def build_results(
    facts: InputFacts, prepared: Prepared | None, frames: list[Frame | None], picked_up: float, current: Scorer
) -> list[pb.Result]:
    """One result per frame. ``current`` names the model for frames no batch ran (rejected before it)."""
    meta = prepared.meta if prepared else None
    total_ms = (time.perf_counter() - picked_up) * 1e3
    out: list[pb.Result] = []
    for index, frame in enumerate(frames):
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
        # The model that ran this frame's batch (a reload may have swapped another in since).
        scored_by: Scorer = timing.scored_by or current  # type: ignore[assignment]
        manifest, backend_name = scored_by
        if error is None and scores is not None:
            try:
                decision = decide(scores, manifest)
            except ValueError as e:
                error = InferenceFailed(str(e))
            else:
                shown = meta or ImageMeta(source_format="")
                out.append(
                    scored_result(
                        facts,
                        manifest,
                        backend_name,
                        shown,
                        decision,
                        times,
                        frame_index=index,
                        frame_count=len(frames),
                    )
                )
                continue
        out.append(rejection(facts, manifest, backend_name, error, times, meta, index, len(frames)))
    return out


def rejection(
    facts: InputFacts,
    manifest: Manifest,
    backend_name: str,
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
        log_failure(log, "input %d: unexpected failure while scoring", facts.input_id, error=error)
        error = ApplianceError(f"Unexpected {type(error).__name__} while scoring; see the daemon's log.")
    result = rejected_result(facts, manifest, backend_name, error, times, meta)
    result.frame_index, result.frame_count = frame_index, frame_count
    return result


def journal_row(r: pb.Result) -> NewResult:
    """A result as the journal stores it."""
    return NewResult(
        frame_index=r.frame_index,
        outcome="scored" if r.outcome == pb.OUTCOME_SCORED else "rejected",
        sop_uid=r.sop_instance_uid,
        payload=r.SerializeToString(),
        transient=r.rejection.code in TRANSIENT_CODES,
    )
