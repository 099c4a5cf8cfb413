"""The journal on a real SQLite file: exactly-once bookkeeping, dedupe, sequences, restart."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from appliance.journal.journal import Journal, NewResult
from tests.journal.old_schemas import SCHEMA_1


def _register(j: Journal, name: str, sha: str, path: str | None = None) -> int:
    reg = j.register(source="folder", path=path or f"/in/{name}", file_name=name, size=10, mtime_ns=1, content_hash=sha)
    return reg.input.id


def _done(j: Journal, input_id: int, frames: int = 1) -> list[int]:
    return j.complete(
        input_id,
        [NewResult(frame_index=i, outcome="scored", sop_uid=f"1.2.{input_id}", payload=b"x") for i in range(frames)],
    )


def test_sequences_increase_without_gaps_and_survive_reopen(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    seqs = []
    for n in range(5):
        seqs += _done(j, _register(j, f"f{n}", f"sha{n}"), frames=2)
    assert seqs == list(range(1, 11))
    j.close()
    j2 = Journal(tmp_path / "j.sqlite3")
    assert j2.last_sequence() == 10
    assert _done(j2, _register(j2, "late", "sha-late")) == [11]
    assert [r.seq for r in j2.results_after(8)] == [9, 10, 11]


def test_same_content_is_a_duplicate_pointing_to_the_first(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    first = _register(j, "a.dcm", "same")
    reg = j.register(source="folder", path="/in/b.dcm", file_name="b.dcm", size=10, mtime_ns=2, content_hash="same")
    assert reg.input.state == "duplicate"
    assert reg.duplicate_of is not None and reg.duplicate_of.id == first
    assert j.counts().duplicates == 1
    assert [p.id for p in j.pending()] == [first]


def test_complete_is_idempotent_so_a_replayed_input_is_scored_once(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    i = _register(j, "a", "sha")
    assert _done(j, i) == [1]
    assert _done(j, i) == []  # the second completion (a replay after a crash) stores nothing
    assert len(j.results_for_input(i)) == 1
    assert j.pending() == []


def test_pending_lists_unfinished_inputs_in_arrival_order(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    ids = [_register(j, f"f{n}", f"s{n}") for n in range(4)]
    _done(j, ids[1])
    assert [p.id for p in j.pending()] == [ids[0], ids[2], ids[3]]
    assert j.counts().queued == 3


def test_lookup_by_file_and_by_sop_uid(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    i = _register(j, "a.dcm", "sha", path="/in/a.dcm")
    _done(j, i)
    found = j.find_file("/in/a.dcm", 10, 1)
    assert found is not None and found.id == i and found.state == "scored"
    assert j.find_file("/in/a.dcm", 11, 1) is None
    stored = j.result_by_sop_uid(f"1.2.{i}")
    assert stored is not None and stored.seq == 1
    assert j.result_by_seq(99) is None


def test_a_dicom_instance_keeps_its_uid_across_a_restart_and_the_latest_result_answers_for_it(
    tmp_path: Path,
) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    common = {"source": "dicom", "size": 10, "mtime_ns": 0, "instance_uid": "1.2.3.4"}
    first = j.register(path="/spool/a.dcm", file_name="1.2.3.4.dcm", content_hash="h1", **common).input.id
    assert [(p.id, p.instance_uid) for p in j.pending()] == [(first, "1.2.3.4")]  # requeued with it
    j.complete(first, [NewResult(frame_index=0, outcome="rejected", sop_uid="1.2.3.4", payload=b"r")])
    # Sent again in another encoding after the rejection: scored, and GetResult by its UID answers with the score.
    again = j.register(path="/spool/b.dcm", file_name="1.2.3.4.dcm", content_hash="h2", **common).input.id
    (seq,) = j.complete(again, [NewResult(frame_index=0, outcome="scored", sop_uid="1.2.3.4", payload=b"s")])
    stored = j.result_by_sop_uid("1.2.3.4")
    assert stored is not None and stored.seq == seq


def test_wait_for_results_wakes_on_commit(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    i = _register(j, "a", "sha")
    woke = threading.Event()

    def waiter() -> None:
        j.wait_for_results(0, timeout=10)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    _done(j, i)
    t.join(5)
    assert woke.is_set()


def test_complete_needs_results(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    with pytest.raises(ValueError):
        j.complete(_register(j, "a", "sha"), [])


def test_paths_that_are_not_utf8_round_trip_exactly(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    odd = os.fsdecode(b"/in/M\xfcller.dcm")  # a Latin-1 name from an SMB share
    i = _register(j, "x", "sha", path=odd)
    found = j.find_file(odd, 10, 1)
    assert found is not None and found.id == i and found.path == odd
    assert os.fsencode(j.pending()[0].path or "") == b"/in/M\xfcller.dcm"


def test_attempts_count_each_start_that_finds_an_input_unfinished(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    a, b = _register(j, "a", "s1"), _register(j, "b", "s2")
    assert j.count_attempt([a]) == {a: 1}
    assert j.count_attempt([a, b]) == {a: 2, b: 1}


def test_a_transient_failure_lets_the_same_content_be_tried_again(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    first = _register(j, "a", "same")
    j.complete(first, [NewResult(frame_index=0, outcome="rejected", sop_uid="", payload=b"x", transient=True)])
    again = j.register(source="folder", path="/in/a2", file_name="a2", size=10, mtime_ns=3, content_hash="same")
    assert again.duplicate_of is None and again.input.state == "queued"
    rejected = _register(j, "b", "other")
    j.complete(rejected, [NewResult(frame_index=0, outcome="rejected", sop_uid="", payload=b"x")])
    assert (
        j.register(
            source="folder", path="/in/b2", file_name="b2", size=10, mtime_ns=4, content_hash="other"
        ).duplicate_of
        is not None
    )  # a real rejection of the content stands


def test_a_journal_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    import sqlite3

    from appliance.domain.errors import ConfigError

    Journal(tmp_path / "j.sqlite3").close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError, match="schema version 99"):
        Journal(tmp_path / "j.sqlite3")


def test_a_version_1_journal_is_migrated_in_place_and_keeps_its_inputs_and_results(tmp_path: Path) -> None:
    import sqlite3

    from appliance.journal.journal import SCHEMA_VERSION

    with sqlite3.connect(tmp_path / "j.sqlite3") as db:  # as 0.1.0 wrote it
        db.executescript(SCHEMA_1)
        db.execute("PRAGMA user_version = 1")
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        db.execute(
            "INSERT INTO inputs (source, path, file_name, size, mtime_ns, content_sha256, state, created_ms, "
            "updated_ms) VALUES ('folder', CAST('/in/a' AS BLOB), 'a', 10, 1, 'old-digest', 'scored', 1, 1)"
        )
        db.execute(
            "INSERT INTO results (input_id, frame_index, outcome, sop_uid, payload, created_ms) "
            "VALUES (1, 0, 'scored', '1.2.3', x'00', 1)"
        )
    j = Journal(tmp_path / "j.sqlite3")
    assert j.get_input(1) is not None and j.get_input(1).content_hash == "old-digest"  # type: ignore[union-attr]
    assert j.last_sequence() == 1
    again = j.register(source="folder", path="/in/a2", file_name="a2", size=10, mtime_ns=2, content_hash="old-digest")
    assert again.duplicate_of is not None and again.duplicate_of.id == 1
    j.close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_complete_many_stores_a_group_in_one_transaction_and_skips_finished_inputs(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    a, b, c = (_register(j, n, f"sha-{n}") for n in "abc")
    assert _done(j, b) == [1]  # finished earlier: the group must not score it again

    def rows(input_id: int, frames: int) -> list[NewResult]:
        return [NewResult(frame_index=i, outcome="scored", sop_uid="", payload=b"y") for i in range(frames)]

    assert j.complete_many([(a, rows(a, 2)), (b, rows(b, 1)), (c, rows(c, 1))]) == [[2, 3], [], [4]]
    assert j.pending() == [] and j.last_sequence() == 4
    j.set_disposed_many([(a, "/done/a"), (c, "")])
    disposed = dict(j._reader().execute("SELECT id, disposed_path FROM inputs").fetchall())
    # a moved aside, c deleted (recorded as empty), b not in the call: untouched.
    assert {i: None if path is None else bytes(path) for i, path in disposed.items()} == {
        a: b"/done/a",
        b: None,
        c: b"",
    }
    with pytest.raises(ValueError):
        j.complete_many([(a, [])])


def test_a_recorded_move_is_never_erased_by_a_later_empty_one(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    i = _register(j, "a", "sha")
    j.set_disposed(i, "/processed/a")
    j.set_disposed(i, "")  # the finisher found the file already moved by a rescan
    row = j._reader().execute("SELECT disposed_path FROM inputs WHERE id = ?", (i,)).fetchone()
    assert bytes(row[0]) == b"/processed/a"


def test_a_dicom_instance_seen_before_is_a_duplicate_whatever_its_bytes(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    kw = {"source": "dicom", "size": 10, "mtime_ns": 0, "instance_uid": "1.2.3"}
    first = j.register(path="/spool/a", file_name="a", content_hash="explicit-vr", **kw)  # type: ignore[arg-type]
    again = j.register(path="/spool/b", file_name="b", content_hash="implicit-vr", **kw)  # type: ignore[arg-type]
    assert first.duplicate_of is None and again.duplicate_of is not None and again.duplicate_of.id == first.input.id
    other = j.register(
        source="dicom", path="/spool/c", file_name="c", size=1, mtime_ns=0, content_hash="x", instance_uid="1.2.4"
    )
    plain = j.register(source="folder", path="/in/d", file_name="d", size=1, mtime_ns=0, content_hash="y")
    assert other.duplicate_of is None and plain.duplicate_of is None  # no UID known: content alone decides
    # A transient failure does not count: the instance sent again is scored.
    j.complete(first.input.id, [NewResult(frame_index=0, outcome="rejected", sop_uid="", payload=b"x", transient=True)])
    retry = j.register(path="/spool/e", file_name="e", content_hash="third", **kw)  # type: ignore[arg-type]
    assert retry.duplicate_of is None
    # A rejection judged those bytes (a syntax that would not decode, say): other bytes of it are tried.
    j.complete(retry.input.id, [NewResult(frame_index=0, outcome="rejected", sop_uid="", payload=b"x")])
    other_bytes = j.register(path="/spool/f", file_name="f", content_hash="fourth", **kw)  # type: ignore[arg-type]
    assert other_bytes.duplicate_of is None
