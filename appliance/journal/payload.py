"""How the journal keeps a result: each row says which version of this format its payload is in, so a
change of the result never needs a rewrite of every stored row, and the wire format (appliance.v1) can
change without touching what is stored.

Version 2: the domain Result as compact JSON, without its sequence number (the row's own key); a series result
(appliance.domain.series.SeriesResult) likewise, in rows whose outcome says 'series'.
Version 1 (journals of schema 1 and 2): an encoded appliance.v1.Result message. Read, never written.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from appliance.domain.result import (
    Decision,
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
from appliance.domain.series import Completion, KeyImage, SeriesResult

VERSION = 2


def encode_series(result: SeriesResult) -> bytes:
    doc = {name: getattr(result, name) for name in _SERIES_PLAIN}
    doc["scores"] = [[s.label, s.score] for s in result.scores]
    doc["decision"] = result.decision.value
    doc["findings"] = list(result.findings)
    doc["key_images"] = [vars(k) for k in result.key_images]
    doc["scored_by"] = vars(result.scored_by)
    doc["completion"] = result.completion.value
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def decode_series(payload: bytes, version: int, sequence: int) -> SeriesResult:
    if version != VERSION:
        raise ValueError(f"series result {sequence} is stored in payload version {version}; this appliance reads 2")
    doc = json.loads(payload)
    return SeriesResult(
        **{name: doc[name] for name in _SERIES_PLAIN},
        scores=tuple(LabelScore(label, score) for label, score in doc["scores"]),
        decision=Decision(doc["decision"]),
        findings=tuple(doc["findings"]),
        key_images=tuple(KeyImage(**k) for k in doc["key_images"]),
        scored_by=ScoredBy(**doc["scored_by"]),
        completion=Completion(doc["completion"]),
        sequence=sequence,
    )


_SERIES_PLAIN = (
    "study_instance_uid",
    "series_instance_uid",
    "accession_number",
    "images_scored",
    "images_rejected",
    "threshold",
    "key_label",
    "combine",
    "revision",
    "created_unix_ms",
    "first_image_unix_ms",
    "last_image_unix_ms",
    "revises_sequence",
    "report_uid",
    "revises_report_uid",
)


def encode(result: Result) -> bytes:
    doc: dict[str, Any] = {
        "input": vars(result.input),
        "scored_by": vars(result.scored_by),
        "outcome": result.outcome.value,
        "created_unix_ms": result.created_unix_ms,
        "timings": vars(result.timings),
        "ids": vars(result.ids),
        "frame_index": result.frame_index,
        "frame_count": result.frame_count,
    }
    if result.outcome is Outcome.SCORED:
        assert result.decision is not None
        doc["scores"] = [[s.label, s.score] for s in result.scores]
        doc["decision"] = result.decision.value
        doc["findings"] = list(result.findings)
        doc["threshold"] = result.threshold
    if result.rejection is not None:
        doc["rejection"] = vars(result.rejection)
    if result.heatmap is not None:
        h = result.heatmap
        doc["heatmap"] = {
            "width": h.width,
            "height": h.height,
            "values": base64.b64encode(h.values).decode("ascii"),
            "label": h.label,
            "method": h.method,
            "extent": list(h.extent),
        }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def decode(payload: bytes, version: int, sequence: int) -> Result:
    """The stored result, numbered. ValueError for a version this appliance does not know."""
    if version == VERSION:
        return _from_json(json.loads(payload), sequence)
    if version == 1:
        return _from_v1(payload, sequence)
    raise ValueError(f"result {sequence} is stored in payload version {version}; this appliance reads 1 and 2")


def _from_json(doc: dict[str, Any], sequence: int) -> Result:
    rejection = doc.get("rejection")
    decision = doc.get("decision")
    return Result(
        input=InputFacts(**doc["input"]),
        scored_by=ScoredBy(**doc["scored_by"]),
        outcome=Outcome(doc["outcome"]),
        created_unix_ms=doc["created_unix_ms"],
        timings=Timings(**doc["timings"]),
        ids=ImageIds(**doc["ids"]),
        frame_index=doc["frame_index"],
        frame_count=doc["frame_count"],
        scores=tuple(LabelScore(label, score) for label, score in doc.get("scores", ())),
        decision=Decision(decision) if decision else None,
        findings=tuple(doc.get("findings", ())),
        threshold=doc.get("threshold", 0.0),
        rejection=Rejection(**rejection) if rejection else None,
        heatmap=_heatmap(doc.get("heatmap")),
        sequence=sequence,
    )


def _heatmap(doc: dict[str, Any] | None) -> Heatmap | None:
    # Added to version 2 without a new version: older rows simply have none.
    if not doc:
        return None
    x0, y0, x1, y1 = (float(v) for v in doc["extent"])
    return Heatmap(
        width=doc["width"],
        height=doc["height"],
        values=base64.b64decode(doc["values"]),
        label=doc["label"],
        method=doc["method"],
        extent=(x0, y0, x1, y1),
    )


def _from_v1(payload: bytes, sequence: int) -> Result:
    # The frozen wire schema these rows were written in; only this reader of old rows needs it.
    from appliance.v1 import scoring_pb2 as pb

    m = pb.Result.FromString(payload)
    scored = m.outcome == pb.OUTCOME_SCORED
    return Result(
        input=InputFacts(m.input_id, m.source, m.file_name, m.content_hash),
        scored_by=ScoredBy(m.model_name, m.model_version, m.backend),
        outcome=Outcome.SCORED if scored else Outcome.REJECTED,
        created_unix_ms=m.created_unix_ms,
        timings=Timings(
            m.timings.decode_ms,
            m.timings.preprocess_ms,
            m.timings.queue_ms,
            m.timings.infer_ms,
            m.timings.total_ms,
            m.timings.batch_size,
        ),
        ids=ImageIds(m.study_instance_uid, m.series_instance_uid, m.sop_instance_uid, m.accession_number),
        frame_index=m.frame_index,
        frame_count=m.frame_count,
        scores=tuple(LabelScore(s.label, s.score) for s in m.scores),
        decision=Decision(pb.Decision.Name(m.decision).removeprefix("DECISION_").lower()) if scored else None,
        findings=tuple(m.findings),
        threshold=m.threshold,
        rejection=None if scored else Rejection(m.rejection.code, m.rejection.message),
        sequence=sequence,
    )
