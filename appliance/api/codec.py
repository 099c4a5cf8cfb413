"""Builds the `appliance.v1.Result` messages the journal stores and the stream sends."""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance.domain.errors import ApplianceError
from appliance.domain.manifest import Manifest
from appliance.imaging.types import ImageMeta
from appliance.inference.postprocess import Scores, Verdict
from appliance.journal.disposal import Outcome
from appliance.journal.journal import StoredResult
from appliance.v1 import scoring_pb2 as pb

_VERDICTS = {
    Verdict.NEGATIVE: pb.DECISION_NEGATIVE,
    Verdict.POSITIVE: pb.DECISION_POSITIVE,
    Verdict.INDETERMINATE: pb.DECISION_INDETERMINATE,
}


@dataclass(frozen=True)
class InputFacts:
    """What is known of an input before it is decoded."""

    input_id: int
    source: str
    file_name: str
    content_hash: str


@dataclass(frozen=True)
class StageTimes:
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 0


def _base(facts: InputFacts, manifest: Manifest, backend: str, times: StageTimes) -> pb.Result:
    return pb.Result(
        model_name=manifest.model.name,
        model_version=manifest.model.version,
        backend=backend,
        file_name=facts.file_name,
        content_hash=facts.content_hash,
        source=facts.source,
        input_id=facts.input_id,
        created_unix_ms=time.time_ns() // 1_000_000,
        timings=pb.Timings(
            decode_ms=times.decode_ms,
            preprocess_ms=times.preprocess_ms,
            queue_ms=times.queue_ms,
            infer_ms=times.infer_ms,
            total_ms=times.total_ms,
            batch_size=times.batch_size,
        ),
    )


def _set_meta(result: pb.Result, meta: ImageMeta) -> None:
    result.study_instance_uid = meta.study_instance_uid
    result.series_instance_uid = meta.series_instance_uid
    result.sop_instance_uid = meta.sop_instance_uid
    result.accession_number = meta.accession_number


def scored_result(
    facts: InputFacts,
    manifest: Manifest,
    backend: str,
    meta: ImageMeta,
    scores: Scores,
    times: StageTimes,
    *,
    frame_index: int,
    frame_count: int,
) -> pb.Result:
    result = _base(facts, manifest, backend, times)
    _set_meta(result, meta)
    result.outcome = pb.OUTCOME_SCORED
    result.scores.extend(pb.LabelScore(label=lb, score=v) for lb, v in zip(scores.labels, scores.values, strict=True))
    result.decision = _VERDICTS[scores.verdict]
    result.findings.extend(scores.findings)
    result.threshold = scores.threshold
    result.frame_index = frame_index
    result.frame_count = frame_count
    return result


def rejected_result(
    facts: InputFacts,
    manifest: Manifest,
    backend: str,
    error: ApplianceError,
    times: StageTimes,
    meta: ImageMeta | None = None,
) -> pb.Result:
    result = _base(facts, manifest, backend, times)
    if meta is not None:
        _set_meta(result, meta)
    result.outcome = pb.OUTCOME_REJECTED
    result.rejection.code = error.code
    result.rejection.message = error.message
    return result


def stored_to_message(stored: StoredResult) -> pb.Result:
    """A journaled result as the stream sends it: the payload with its sequence number."""
    result = pb.Result.FromString(stored.payload)
    result.sequence = stored.seq
    return result


def result_to_dict(result: pb.Result) -> dict[str, object]:
    """A JSON-ready view, the same for `appliance score` and `appliance-client`."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=False)


def outcome_of(result: pb.Result) -> Outcome:
    """What the disposal policy needs of a result."""
    if result.outcome == pb.OUTCOME_REJECTED:
        return Outcome(rejected=True, code=result.rejection.code, message=result.rejection.message)
    return Outcome(rejected=False)


def stored_outcome(stored: StoredResult) -> Outcome:
    return outcome_of(pb.Result.FromString(stored.payload))
