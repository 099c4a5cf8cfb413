"""The API's wire form: the domain Result and SeriesResult as an `appliance.v1.Result` message (and a heatmap and a
series result back, for terminals), a JSON view of one for people (`appliance score`, `appliance-client --json`), and
the model served, the daemon's status and a reload's outcome as the API answers them."""

from __future__ import annotations

import time
from pathlib import Path

from appliance import __version__
from appliance.domain.delivery import Delivery, DeliveryState
from appliance.domain.result import Decision, Heatmap, LabelScore, Outcome, Result, ScoredBy
from appliance.domain.series import Completion, KeyImage, SeriesResult
from appliance.inference.loader import Served, expected_sample_shape
from appliance.journal.journal import Counts, StoredResult
from appliance.scoring.served import Reload
from appliance.v1 import scoring_pb2 as pb

_DECISIONS = {
    Decision.NEGATIVE: pb.DECISION_NEGATIVE,
    Decision.POSITIVE: pb.DECISION_POSITIVE,
    Decision.INDETERMINATE: pb.DECISION_INDETERMINATE,
}
_OUTCOMES = {Outcome.SCORED: pb.OUTCOME_SCORED, Outcome.REJECTED: pb.OUTCOME_REJECTED}
_DELIVERIES = {
    DeliveryState.PENDING: pb.DELIVERY_PENDING,
    DeliveryState.DELIVERED: pb.DELIVERY_DELIVERED,
    DeliveryState.REFUSED: pb.DELIVERY_REFUSED,
}
_COMPLETIONS = {Completion.STABLE: pb.COMPLETION_STABLE, Completion.HEADER: pb.COMPLETION_HEADER}
_DECIDED = {v: k for k, v in _DECISIONS.items()}
_COMPLETED = {v: k for k, v in _COMPLETIONS.items()}


def to_message(result: Result, delivery: Delivery | None = None) -> pb.Result:
    """The wire message; ``delivery`` (where its DICOM report stands) where the caller looked it up."""
    t = result.timings
    message = pb.Result(
        sequence=result.sequence,
        outcome=_OUTCOMES[result.outcome],
        model_name=result.scored_by.model_name,
        model_version=result.scored_by.model_version,
        backend=result.scored_by.backend,
        file_name=result.input.file_name,
        content_hash=result.input.content_hash,
        source=result.input.source,
        input_id=result.input.input_id,
        created_unix_ms=result.created_unix_ms,
        timings=pb.Timings(
            decode_ms=t.decode_ms,
            preprocess_ms=t.preprocess_ms,
            queue_ms=t.queue_ms,
            infer_ms=t.infer_ms,
            total_ms=t.total_ms,
            batch_size=t.batch_size,
        ),
        study_instance_uid=result.ids.study_instance_uid,
        series_instance_uid=result.ids.series_instance_uid,
        sop_instance_uid=result.ids.sop_instance_uid,
        accession_number=result.ids.accession_number,
        frame_index=result.frame_index,
        frame_count=result.frame_count,
        scores=[pb.LabelScore(label=s.label, score=s.score) for s in result.scores],
        findings=result.findings,
        threshold=result.threshold,
    )
    if result.decision is not None:
        message.decision = _DECISIONS[result.decision]
    if result.rejection is not None:
        message.rejection.code = result.rejection.code
        message.rejection.message = result.rejection.message
    if result.heatmap is not None:
        h = result.heatmap
        x0, y0, x1, y1 = h.extent
        message.heatmap.CopyFrom(
            pb.Heatmap(
                width=h.width,
                height=h.height,
                values=h.values,
                label=h.label,
                method=h.method,
                extent=pb.Extent(x0=x0, y0=y0, x1=x1, y1=y1),
            )
        )
    if delivery is not None:
        message.delivery.CopyFrom(_delivery(delivery))
    return message


def series_message(series: SeriesResult, delivery: Delivery | None = None) -> pb.Result:
    """A series result's wire message: a Result with only its sequence and its ``series`` set (the image fields
    stay empty); ``delivery`` (where its SR stands) where the caller looked it up."""
    by = series.scored_by
    body = pb.SeriesResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        accession_number=series.accession_number,
        images_scored=series.images_scored,
        images_rejected=series.images_rejected,
        scores=[pb.LabelScore(label=s.label, score=s.score) for s in series.scores],
        decision=_DECISIONS[series.decision],
        findings=series.findings,
        threshold=series.threshold,
        key_label=series.key_label,
        key_images=[
            pb.KeyImage(
                sop_instance_uid=k.sop_instance_uid,
                frame_index=k.frame_index,
                score=k.score,
                sequence=k.sequence,
            )
            for k in series.key_images
        ],
        model_name=by.model_name,
        model_version=by.model_version,
        backend=by.backend,
        combine=series.combine,
        completion=_COMPLETIONS[series.completion],
        revision=series.revision,
        revises_sequence=series.revises_sequence,
        report_sop_instance_uid=series.report_uid,
        revises_report_sop_instance_uid=series.revises_report_uid,
        created_unix_ms=series.created_unix_ms,
        first_image_unix_ms=series.first_image_unix_ms,
        last_image_unix_ms=series.last_image_unix_ms,
    )
    if delivery is not None:
        body.delivery.CopyFrom(_delivery(delivery))
    return pb.Result(sequence=series.sequence, series=body)


def series_from_message(message: pb.Result) -> SeriesResult:
    """A series result as a terminal received it, in the domain's form. ValueError where the message is not one."""
    if not message.HasField("series"):
        raise ValueError(f"result {message.sequence} is not a series result")
    s = message.series
    if s.decision not in _DECIDED or s.completion not in _COMPLETED:
        raise ValueError(f"series result {message.sequence} has no decision or no completion")
    return SeriesResult(
        study_instance_uid=s.study_instance_uid,
        series_instance_uid=s.series_instance_uid,
        accession_number=s.accession_number,
        images_scored=s.images_scored,
        images_rejected=s.images_rejected,
        scores=tuple(LabelScore(x.label, x.score) for x in s.scores),
        decision=_DECIDED[s.decision],
        findings=tuple(s.findings),
        threshold=s.threshold,
        key_label=s.key_label,
        key_images=tuple(KeyImage(k.sop_instance_uid, k.frame_index, k.score, k.sequence) for k in s.key_images),
        scored_by=ScoredBy(s.model_name, s.model_version, s.backend),
        combine=s.combine,
        completion=_COMPLETED[s.completion],
        revision=s.revision,
        created_unix_ms=s.created_unix_ms,
        first_image_unix_ms=s.first_image_unix_ms,
        last_image_unix_ms=s.last_image_unix_ms,
        revises_sequence=s.revises_sequence,
        report_uid=s.report_sop_instance_uid,
        revises_report_uid=s.revises_report_sop_instance_uid,
        sequence=message.sequence,
    )


def stored_message(stored: StoredResult, delivery: Delivery | None = None) -> pb.Result:
    """A stored result of either kind as its wire message."""
    if stored.kind == "series":
        return series_message(stored.series(), delivery)
    return to_message(stored.result(), delivery)


def _delivery(delivery: Delivery) -> pb.Delivery:
    return pb.Delivery(
        state=_DELIVERIES[delivery.state],
        attempts=delivery.attempts,
        status=delivery.status or 0,
        reason=delivery.reason,
        report_sop_instance_uid=delivery.sop_instance_uid,
    )


def heatmap_from_message(h: pb.Heatmap) -> Heatmap:
    """A result's heatmap as the terminal received it, in the domain's form (its peak, its place on the image)."""
    e = h.extent
    return Heatmap(h.width, h.height, h.values, h.label, h.method, (e.x0, e.y0, e.x1, e.y1))


def encoded(result: Result) -> bytes:
    """The message as the stream sends it, encoded once for every stream that sends it."""
    return to_message(result).SerializeToString()


def encoded_stored(stored: StoredResult) -> bytes:
    """A stored result of either kind as the stream sends it."""
    return stored_message(stored).SerializeToString()


def result_to_dict(result: pb.Result) -> dict[str, object]:
    """A JSON-ready view, the same for `appliance score` and `appliance-client`."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=False)


def model_info(served: Served) -> pb.ModelInfo:
    """The model served: what it is, what it takes, how it decides, and which artifact runs it and why."""
    m = served.manifest
    backend = served.backend
    return pb.ModelInfo(
        name=m.model.name,
        version=m.model.version,
        description=m.model.description,
        backend=backend.name,
        artifact=backend.artifact,
        labels=m.output.labels,
        input_layout=m.input.layout,
        input_shape=list(expected_sample_shape(served.loaded)),
        max_batch=backend.max_batch,
        decision_rule=m.decision.rule,
        threshold=m.decision.threshold,
        precision=served.precision,
        served_because=served.reason,
        passed_over=served.passed_over,
    )


def status(
    served: Served,
    generation: int,
    counts: Counts,
    outbox_depth: tuple[int, int | None],
    *,
    uptime_s: float,
    watch_dir: Path,
    ready: bool,
    problems: list[str],
    engine_build: str = "",
) -> pb.Status:
    """GetStatus's answer. ``outbox_depth``: the journal's (pending, when the oldest was stored, in ms)."""
    pending, oldest_ms = outbox_depth
    return pb.Status(
        version=__version__,
        model=model_info(served),
        backend=served.backend.name,
        queue_depth=counts.queued,
        scored=counts.scored,
        rejected=counts.rejected,
        duplicates=counts.duplicates,
        last_sequence=counts.last_sequence,
        uptime_s=uptime_s,
        watch_dir=str(watch_dir),
        ready=ready,
        problems=problems,
        model_generation=generation,
        outbox_pending=pending,
        outbox_oldest_age_s=max(0.0, time.time() - oldest_ms / 1e3) if oldest_ms else 0.0,
        engine_build=engine_build,
    )


def reload_answer(reload: Reload, served: Served) -> pb.ReloadModelResponse:
    """ReloadModel's answer, with the model that serves after it (none where another reload was under way)."""
    if reload.under_way:
        return pb.ReloadModelResponse(reloaded=False, message=reload.message)
    return pb.ReloadModelResponse(reloaded=reload.reloaded, message=reload.message, model=model_info(served))
