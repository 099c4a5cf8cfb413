"""The API's wire form: the domain Result as an `appliance.v1.Result` message (and a heatmap back, for terminals),
a JSON view of one for people (`appliance score`, `appliance-client --json`), and the model served, the daemon's
status and a reload's outcome as the API answers them."""

from __future__ import annotations

import time
from pathlib import Path

from appliance import __version__
from appliance.domain.delivery import Delivery, DeliveryState
from appliance.domain.result import Decision, Heatmap, Outcome, Result
from appliance.inference.loader import Served, expected_sample_shape
from appliance.journal.journal import Counts
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
        message.delivery.CopyFrom(
            pb.Delivery(
                state=_DELIVERIES[delivery.state],
                attempts=delivery.attempts,
                status=delivery.status or 0,
                reason=delivery.reason,
                report_sop_instance_uid=delivery.sop_instance_uid,
            )
        )
    return message


def heatmap_from_message(h: pb.Heatmap) -> Heatmap:
    """A result's heatmap as the terminal received it, in the domain's form (its peak, its place on the image)."""
    e = h.extent
    return Heatmap(h.width, h.height, h.values, h.label, h.method, (e.x0, e.y0, e.x1, e.y1))


def encoded(result: Result) -> bytes:
    """The message as the stream sends it, encoded once for every stream that sends it."""
    return to_message(result).SerializeToString()


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
    )


def reload_answer(reload: Reload, served: Served) -> pb.ReloadModelResponse:
    """ReloadModel's answer, with the model that serves after it (none where another reload was under way)."""
    if reload.under_way:
        return pb.ReloadModelResponse(reloaded=False, message=reload.message)
    return pb.ReloadModelResponse(reloaded=reload.reloaded, message=reload.message, model=model_info(served))
