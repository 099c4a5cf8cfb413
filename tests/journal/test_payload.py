"""What the journal stores of a result: the domain Result, versioned per row; old rows still read."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.api.codec import to_message
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
from appliance.journal import payload
from appliance.journal.journal import SCHEMA_VERSION, Journal, NewResult
from tests.journal.old_schemas import SCHEMA_2

SCORED = Result(
    input=InputFacts(7, "folder", "slice-ü.dcm", "ab" * 32),
    scored_by=ScoredBy("brain-mri-vgg16", "0.1.1", "onnxruntime"),
    outcome=Outcome.SCORED,
    created_unix_ms=1_790_000_000_000,
    timings=Timings(1.5, 2.25, 0.5, 8.0, 12.75, 4),
    ids=ImageIds("1.2.3", "1.2.3.4", "1.2.3.4.5", "ACC1"),
    frame_index=1,
    frame_count=3,
    scores=(LabelScore("glioma", 0.75), LabelScore("notumor", 0.25)),
    decision=Decision.POSITIVE,
    findings=("glioma",),
    threshold=0.5,
)
REJECTED = Result(
    input=InputFacts(8, "grpc", "upload", "cd" * 32),
    scored_by=ScoredBy("brain-mri-vgg16", "0.1.1", "onnxruntime"),
    outcome=Outcome.REJECTED,
    created_unix_ms=1_790_000_000_001,
    rejection=Rejection("corrupt_image", "The PNG is cut short."),
)


@pytest.mark.parametrize("result", [SCORED, REJECTED], ids=["scored", "rejected"])
def test_a_result_reads_back_as_it_was_written_with_its_sequence(result: Result) -> None:
    back = payload.decode(payload.encode(result), payload.VERSION, 42)
    assert back.sequence == 42
    assert back == Result(**{**vars(result), "sequence": 42})


@pytest.mark.parametrize("result", [SCORED, REJECTED], ids=["scored", "rejected"])
def test_a_version_1_row_reads_as_the_same_result(result: Result) -> None:
    """Rows written before payload versions hold the wire message; they read as the same domain result."""
    legacy = to_message(result).SerializeToString()
    back = payload.decode(legacy, 1, 5)
    assert to_message(back) == to_message(Result(**{**vars(result), "sequence": 5}))
    assert back.outcome is result.outcome and back.rejection == result.rejection and back.decision == result.decision


def test_an_unknown_payload_version_is_refused_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="payload version 9"):
        payload.decode(b"{}", 9, 3)


def test_a_version_2_journal_is_upgraded_whole_and_its_old_results_still_read(tmp_path: Path) -> None:
    """Schema 2 allowed only two sources and stored wire messages: after the upgrade a new way in registers,
    old rows read as version 1 and new rows are written as the current version."""
    path = tmp_path / "j.sqlite3"
    legacy = to_message(REJECTED).SerializeToString()
    with sqlite3.connect(path) as db:  # as the previous release wrote it
        db.executescript(SCHEMA_2)
        db.execute("PRAGMA user_version = 2")
        db.execute(
            "INSERT INTO inputs (source, path, file_name, size, mtime_ns, content_hash, state, created_ms, "
            "updated_ms) VALUES ('grpc', CAST('/spool/a' AS BLOB), 'upload', 10, 1, 'old', 'rejected', 1, 1)"
        )
        db.execute(
            "INSERT INTO results (input_id, frame_index, outcome, sop_uid, payload, created_ms) "
            "VALUES (1, 0, 'rejected', '', ?, 1)",
            (legacy,),
        )
        with pytest.raises(sqlite3.IntegrityError):  # what the upgrade lifts
            db.execute(
                "INSERT INTO inputs (source, file_name, size, mtime_ns, content_hash, state, created_ms, updated_ms) "
                "VALUES ('dicom', 'x', 1, 1, 'x', 'queued', 1, 1)"
            )
    j = Journal(path)
    (old,) = j.results_for_input(1)
    assert old.payload_version == 1 and old.result().rejection == REJECTED.rejection
    reg = j.register(source="dicom", path="/spool/b", file_name="b", size=3, mtime_ns=0, content_hash="new")
    assert reg.input.source == "dicom" and reg.duplicate_of is None
    seqs = j.complete(reg.input.id, [NewResult(0, "scored", "", payload.encode(SCORED))])
    (new,) = j.results_for_input(reg.input.id)
    assert new.payload_version == payload.VERSION and new.result().findings == ("glioma",) and new.seq == seqs[0]
    again = j.register(source="dicom", path="/spool/c", file_name="c", size=3, mtime_ns=0, content_hash="new")
    assert again.duplicate_of is not None and again.duplicate_of.id == reg.input.id  # dedupe index rebuilt
    j.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"inputs_one_per_content", "inputs_by_state", "inputs_by_file"} <= indexes


def test_an_empty_source_is_still_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    with pytest.raises(sqlite3.IntegrityError):
        j.register(source="", path="/x", file_name="x", size=1, mtime_ns=0, content_hash="h")


def test_a_version_3_journal_is_upgraded_and_gains_instance_dedupe_and_the_outbox(tmp_path: Path) -> None:
    from tests.journal.old_schemas import SCHEMA_3

    path = tmp_path / "j.sqlite3"
    with sqlite3.connect(path) as db:  # as issue 11's release wrote it
        db.executescript(SCHEMA_3)
        db.execute("PRAGMA user_version = 3")
        db.execute(
            "INSERT INTO inputs (source, path, file_name, size, mtime_ns, content_hash, state, created_ms, "
            "updated_ms) VALUES ('dicom', CAST('/spool/a' AS BLOB), 'a', 10, 1, 'old', 'queued', 1, 1)"
        )
    j = Journal(path)
    assert [row.id for row in j.pending()] == [1]  # what was queued stays queued
    first = j.register(
        source="dicom", path="/spool/b", file_name="b", size=1, mtime_ns=0, content_hash="b", instance_uid="9.9"
    )
    again = j.register(
        source="dicom", path="/spool/c", file_name="c", size=1, mtime_ns=0, content_hash="c", instance_uid="9.9"
    )
    assert first.duplicate_of is None and again.duplicate_of is not None and again.duplicate_of.id == first.input.id
    assert j.outbox_depth() == (0, None)
    j.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_heatmap_reads_back_byte_for_byte_and_goes_on_the_wire() -> None:
    heat = Heatmap(
        width=3,
        height=2,
        values=bytes([0, 17, 255, 3, 0, 128]),
        label="glioma",
        method="gradcam",
        extent=(-12.5, 0.0, 180.5, 192.0),
    )
    with_heat = Result(**{**vars(SCORED), "heatmap": heat})
    back = payload.decode(payload.encode(with_heat), payload.VERSION, 9)
    assert back.heatmap == heat
    # Rows stored before heatmaps existed are the same version and read as results without one.
    assert payload.decode(payload.encode(SCORED), payload.VERSION, 9).heatmap is None

    wire = to_message(with_heat).heatmap
    assert (wire.width, wire.height, wire.values, wire.label, wire.method) == (3, 2, heat.values, "glioma", "gradcam")
    assert (wire.extent.x0, wire.extent.y0, wire.extent.x1, wire.extent.y1) == (-12.5, 0.0, 180.5, 192.0)
    assert not to_message(SCORED).HasField("heatmap")
    # The peak's centre in source pixels: cell (0, 2) of cells 64.33 wide and 96 high.
    x, y = heat.peak
    assert (x, y) == pytest.approx((-12.5 + 2.5 * 193.0 / 3, 48.0))
