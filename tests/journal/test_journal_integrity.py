"""A damaged journal is refused with one sentence, never replaced; `recover` salvages it and never reuses a number.

Every case damages a real SQLite file for real (truncation, pages overwritten, a zeroed header, deletion,
another journal swapped in, an older copy restored) and opens it the way the daemon does.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.domain.errors import ConfigError, JournalDamaged
from appliance.journal.integrity import RESERVE, check, marker_path, open_journal, read_marker, recover
from appliance.journal.journal import Journal, NewResult

RESULTS = 300


def _fill(j: Journal, count: int, start: int = 0) -> list[int]:
    """``count`` inputs, each with one scored result; returns their sequence numbers."""
    seqs: list[int] = []
    for n in range(start, start + count):
        reg = j.register(
            source="folder", path=f"/in/f{n}.png", file_name=f"f{n}.png", size=1, mtime_ns=n, content_hash=f"h{n}"
        )
        seqs += j.complete(
            reg.input.id, [NewResult(frame_index=0, outcome="scored", sop_uid=f"1.2.{n}", payload=b"p" * 600)]
        )
    return seqs


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    """A journal with RESULTS results, opened and closed cleanly the daemon's way."""
    path = tmp_path / "data" / "journal.sqlite3"
    j = open_journal(path)
    assert _fill(j, RESULTS) == list(range(1, RESULTS + 1))
    j.close()
    return path


def _refused(path: Path) -> str:
    with pytest.raises(JournalDamaged) as caught:
        open_journal(path)
    message = caught.value.message
    assert "appliance journal recover" in message and "\n" not in message
    assert check(path) == message  # `appliance journal check` says the same as the refused start
    return message


def _page_size(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(16)
        size = int.from_bytes(f.read(2), "big")
    return 65536 if size == 1 else size


def _results_pages(path: Path) -> list[int]:
    """Leaf pages of the results table, from SQLite's own dbstat (its middle part of the file otherwise)."""
    with sqlite3.connect(path) as db:
        try:
            return [p for (p,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'results' AND pagetype = 'leaf'")]
        except sqlite3.OperationalError:
            pages = path.stat().st_size // _page_size(path)
            return list(range(pages // 2, pages - 2))


def _overwrite_pages(path: Path, pages: list[int]) -> None:
    size = _page_size(path)
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * size)
            f.write(b"\xa5" * size)


def _stream_from(j: Journal, after: int) -> list[int]:
    return [r.seq for r in j.results_after(after, limit=10_000)]


# --- start-up: created, adopted, refused --------------------------------------------------------------


def test_a_new_journal_gets_an_identity_and_a_marker_that_stays_above_its_numbers(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    j = open_journal(path)
    marker = read_marker(path)
    assert marker is not None and marker.journal_id == j.identity() and marker.ceiling >= RESERVE
    _fill(j, RESERVE + 5)  # past the first reservation: the marker is raised before the numbers are stored
    marker = read_marker(path)
    assert marker is not None and marker.ceiling >= RESERVE + 5
    j.close()
    marker = read_marker(path)
    assert marker is not None and marker.floor == RESERVE + 5 and marker.ceiling >= RESERVE + 5
    assert check(path) is None
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.new"))


def test_a_journal_from_before_markers_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    old = Journal(path)
    _fill(old, 7)
    old.close()
    assert not marker_path(path).exists()
    j = open_journal(path)
    marker = read_marker(path)
    assert marker is not None and marker.journal_id == j.identity() and marker.floor == 7
    assert _fill(j, 1, start=7) == [8]
    j.close()


def test_a_second_opener_is_refused_while_the_first_holds_the_journal(journal_path: Path) -> None:
    j = open_journal(journal_path)
    with pytest.raises(ConfigError, match="in use by another appliance process"):
        open_journal(journal_path)
    with pytest.raises(ConfigError, match="in use"):
        recover(journal_path)
    j.close()
    open_journal(journal_path).close()


def test_truncated_to_zero_bytes_is_refused(journal_path: Path) -> None:
    journal_path.write_bytes(b"")
    assert "empty (0 bytes)" in _refused(journal_path)
    assert journal_path.stat().st_size == 0  # nothing was replaced


def test_zero_bytes_is_refused_even_without_a_marker(journal_path: Path) -> None:
    journal_path.write_bytes(b"")
    marker_path(journal_path).unlink()
    assert "empty (0 bytes)" in _refused(journal_path)


def test_truncated_to_half_is_refused(journal_path: Path) -> None:
    size = journal_path.stat().st_size
    os.truncate(journal_path, size // 2)
    assert "truncated" in _refused(journal_path)


def test_pages_overwritten_in_the_middle_are_refused(journal_path: Path) -> None:
    pages = _results_pages(journal_path)
    _overwrite_pages(journal_path, pages[len(pages) // 2 : len(pages) // 2 + 2])
    assert "malformed" in _refused(journal_path)


def test_a_damaged_header_is_refused_without_a_traceback(journal_path: Path) -> None:
    with open(journal_path, "r+b") as f:
        f.write(b"\0" * 100)
    assert "header is damaged" in _refused(journal_path)
    # Journal() itself, opened on it directly, also turns SQLite's error into the sentence.
    with pytest.raises(JournalDamaged, match="appliance journal recover"):
        Journal(journal_path)


def test_a_deleted_journal_is_refused_while_its_marker_remains(journal_path: Path) -> None:
    journal_path.unlink()
    assert "is missing" in _refused(journal_path)
    assert not journal_path.exists()  # not silently made anew


def test_another_journal_swapped_in_is_refused(journal_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "journal.sqlite3"
    j = open_journal(other)
    _fill(j, RESULTS + 10)
    j.close()
    shutil.copyfile(other, journal_path)
    assert "another journal" in _refused(journal_path)


def test_an_older_copy_restored_is_refused(journal_path: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup.sqlite3"
    shutil.copyfile(journal_path, backup)
    j = open_journal(journal_path)
    _fill(j, 5, start=RESULTS)
    j.close()
    shutil.copyfile(backup, journal_path)
    assert f"up to #{RESULTS} only, though #{RESULTS + 5}" in _refused(journal_path)


def test_an_unreadable_marker_is_refused(journal_path: Path) -> None:
    marker_path(journal_path).write_text("{not json")
    assert "unreadable marker" in _refused(journal_path)


# --- recovery -----------------------------------------------------------------------------------------


def _recovered(path: Path) -> tuple[list[str], Journal]:
    ceiling_before = read_marker(path)
    lines = recover(path)
    assert any(line.startswith("numbering: new results continue after #") for line in lines), lines
    assert check(path) is None, lines
    j = open_journal(path)
    if ceiling_before is not None:
        new = _fill(j, 1, start=10_000)
        assert new[0] > ceiling_before.ceiling >= RESULTS  # never a number a terminal may have seen
    return lines, j


def test_recover_after_pages_overwritten_keeps_the_readable_rows(journal_path: Path) -> None:
    pages = _results_pages(journal_path)
    _overwrite_pages(journal_path, pages[len(pages) // 2 : len(pages) // 2 + 2])
    lines, j = _recovered(journal_path)
    kept = _stream_from(j, 0)
    assert 0 < len([s for s in kept if s <= RESULTS]) < RESULTS  # some rows were on the overwritten pages
    assert kept[:5] == [1, 2, 3, 4, 5]
    assert any(line.startswith("lost: at least") for line in lines), lines
    assert list(journal_path.parent.glob("journal.sqlite3.damaged-*")), "the damaged journal is kept aside"
    # Inputs whose results were lost count as failed: their content, dropped again, is scored again.
    counts = j.counts()
    assert counts.queued == 0
    j.close()


def test_recover_after_a_zeroed_header_salvages_everything(journal_path: Path) -> None:
    with open(journal_path, "r+b") as f:
        f.write(b"\0" * 100)
    lines, j = _recovered(journal_path)
    assert any("header was damaged and was rebuilt" in line for line in lines), lines
    assert _stream_from(j, 0)[:RESULTS] == list(range(1, RESULTS + 1))
    j.close()


def test_recover_of_a_deleted_journal_continues_after_the_marker(journal_path: Path) -> None:
    journal_path.unlink()
    lines, j = _recovered(journal_path)
    assert any(f"at least {RESULTS} results" in line for line in lines), lines
    assert _stream_from(j, RESULTS) == [j.last_sequence()]  # a terminal resuming after #300 gets the new one
    j.close()


def test_recover_of_an_empty_journal_continues_after_the_marker(journal_path: Path) -> None:
    journal_path.write_bytes(b"")
    _lines, j = _recovered(journal_path)
    j.close()


def test_recover_of_a_truncated_journal_keeps_its_first_half(journal_path: Path) -> None:
    os.truncate(journal_path, journal_path.stat().st_size // 2)
    _lines, j = _recovered(journal_path)
    j.close()


def test_recover_does_not_import_another_journal(journal_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "journal.sqlite3"
    j = open_journal(other)
    _fill(j, 3)
    j.close()
    shutil.copyfile(other, journal_path)
    lines, j = _recovered(journal_path)
    assert any(line.startswith("not imported") for line in lines), lines
    assert [s for s in _stream_from(j, 0) if s <= RESULTS] == []
    j.close()


def test_recover_keeps_queued_inputs_queued(journal_path: Path) -> None:
    j = open_journal(journal_path)
    reg = j.register(source="folder", path="/in/q.png", file_name="q.png", size=1, mtime_ns=1, content_hash="q")
    j.close()
    with open(journal_path, "r+b") as f:
        f.write(b"\0" * 100)
    _lines, j = _recovered(journal_path)
    assert [row.id for row in j.pending()] == [reg.input.id]
    j.close()


def test_recover_of_a_sound_journal_changes_nothing(journal_path: Path) -> None:
    before = journal_path.read_bytes()
    assert recover(journal_path)[0].startswith("ok:")
    assert journal_path.read_bytes() == before


def test_recover_without_a_marker_leaves_a_margin(journal_path: Path) -> None:
    marker_path(journal_path).unlink()
    journal_path.write_bytes(b"")
    lines = recover(journal_path)
    assert any(f"{RESERVE} past the highest number found" in line for line in lines), lines
    j = open_journal(journal_path)
    assert _fill(j, 1) == [RESERVE + 1]
    j.close()


# --- at runtime ---------------------------------------------------------------------------------------


def test_damage_found_at_runtime_stops_every_write_and_says_so(journal_path: Path) -> None:
    j = open_journal(journal_path)
    heard: list[str] = []
    j.on_damage(heard.append)
    pages = _results_pages(journal_path)
    _overwrite_pages(journal_path, pages[len(pages) // 2 : len(pages) // 2 + 2])
    assert j.problem() is None

    def stream() -> None:  # a terminal's stream, on its own connection (not the pages cached before)
        with pytest.raises(JournalDamaged):
            _stream_from(j, 0)

    reader = threading.Thread(target=stream)
    reader.start()
    reader.join()
    problem = j.problem()
    assert problem is not None and "damaged" in problem and "appliance journal recover" in problem
    assert heard == [problem]
    # No file is taken (find_file is the ingest's gate) and nothing is stored or moved.
    with pytest.raises(JournalDamaged):
        j.find_file("/in/new.png", 1, 1)
    with pytest.raises(JournalDamaged):
        j.register(source="folder", path="/in/new.png", file_name="new.png", size=1, mtime_ns=1, content_hash="n")
    with pytest.raises(JournalDamaged):
        j.complete(1, [NewResult(frame_index=1, outcome="scored", sop_uid="", payload=b"")])
    assert j.counts().last_sequence in (0, RESULTS)  # GetStatus still answers, with the problem beside it
    j.close()
    assert "malformed" in _refused(journal_path)


def test_marker_is_plain_json_written_atomically(journal_path: Path) -> None:
    body = json.loads(marker_path(journal_path).read_text())
    assert set(body) >= {"journal_id", "ceiling", "floor"}
    assert not list(journal_path.parent.glob("*.tmp"))  # nor its temporary file, whatever its name


def test_recover_of_a_journal_from_the_previous_release_keeps_its_results_readable(tmp_path: Path) -> None:
    """A schema-2 journal (no payload versions) is salvaged into the current schema: its rows say version 1
    and still read as the results they were."""
    from appliance.api.codec import to_message
    from tests.journal.old_schemas import SCHEMA_2
    from tests.journal.test_payload import SCORED

    path = tmp_path / "data" / "journal.sqlite3"
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_2)
        db.execute("PRAGMA user_version = 2")
        for n in range(1, 4):
            db.execute(
                "INSERT INTO inputs (source, path, file_name, size, mtime_ns, content_hash, state, created_ms, "
                "updated_ms) VALUES ('folder', CAST(? AS BLOB), 'a', 10, 1, ?, 'scored', 1, 1)",
                (f"/in/{n}", f"h{n}"),
            )
            db.execute(
                "INSERT INTO results (input_id, frame_index, outcome, sop_uid, payload, created_ms) "
                "VALUES (?, 0, 'scored', '', ?, 1)",
                (n, to_message(SCORED).SerializeToString()),
            )
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)
    lines, j = _recovered(path)
    stored = j.results_after(0)
    assert [s.seq for s in stored][:3] == [1, 2, 3], lines
    assert {s.payload_version for s in stored[:3]} == {1}
    assert stored[0].result().findings == SCORED.findings and stored[0].result().sequence == 1
    j.close()


# --- the marker's copy outside the data folder ----------------------------------------------------------


@pytest.fixture
def kept_apart(tmp_path: Path) -> tuple[Path, Path]:
    """A journal with RESULTS results whose marker is also copied to a folder beside the data folder."""
    path = tmp_path / "data" / "journal.sqlite3"
    identity = tmp_path / "data.identity"
    j = open_journal(path, identity)
    _fill(j, RESULTS)
    j.close()
    return path, identity


def _refused_apart(path: Path, identity: Path) -> str:
    with pytest.raises(JournalDamaged) as caught:
        open_journal(path, identity)
    assert check(path, identity) == caught.value.message
    return caught.value.message


def test_the_marker_is_copied_outside_the_data_folder_and_kept_in_step(kept_apart: tuple[Path, Path]) -> None:
    path, identity = kept_apart
    beside, copy = read_marker(path), read_marker(path.parent.parent / "nowhere" / path.name, None)
    assert copy is None
    apart = json.loads((identity / marker_path(path).name).read_text())
    assert beside is not None and apart["journal_id"] == beside.journal_id and apart["floor"] == RESULTS
    assert (identity.stat().st_mode & 0o777) == 0o700
    assert ((identity / marker_path(path).name).stat().st_mode & 0o777) == 0o600


def test_the_data_folder_emptied_is_refused_not_started_anew(kept_apart: tuple[Path, Path]) -> None:
    path, identity = kept_apart
    marker = read_marker(path)
    assert marker is not None and marker.ceiling >= RESULTS
    for part in path.parent.iterdir():
        part.unlink()
    message = _refused_apart(path, identity)
    assert "is missing" in message and f"#{RESULTS} issued" in message and "marker's copy" in message
    assert not path.exists()
    lines = recover(path, identity)
    assert any(f"continue after #{marker.ceiling} " in line for line in lines), lines
    j = open_journal(path, identity)
    assert _fill(j, 1, start=10_000)[0] > marker.ceiling  # a terminal resuming from any old number gets it
    j.close()


def test_an_older_copy_with_its_marker_deleted_is_refused_by_the_copy(
    kept_apart: tuple[Path, Path], tmp_path: Path
) -> None:
    path, identity = kept_apart
    backup = tmp_path / "backup.sqlite3"
    shutil.copyfile(path, backup)
    j = open_journal(path, identity)
    _fill(j, 5, start=RESULTS)
    j.close()
    shutil.copyfile(backup, path)
    marker_path(path).unlink()
    assert f"up to #{RESULTS} only, though #{RESULTS + 5}" in _refused_apart(path, identity)


def test_a_deleted_marker_is_written_again_from_its_copy(
    kept_apart: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path, identity = kept_apart
    ceiling = read_marker(path)
    marker_path(path).unlink()
    j = open_journal(path, identity)
    assert _fill(j, 1, start=RESULTS)[0] == RESULTS + 1  # no gap, no reuse
    j.close()
    restored = read_marker(path)
    assert ceiling is not None and restored is not None and restored.journal_id == ceiling.journal_id
    assert "was missing; its copy" in caplog.text


def test_a_marker_and_a_copy_naming_different_journals_are_refused(
    kept_apart: tuple[Path, Path], tmp_path: Path
) -> None:
    path, identity = kept_apart
    other = tmp_path / "other" / "journal.sqlite3"
    open_journal(other).close()
    shutil.copyfile(marker_path(other), identity / marker_path(path).name)
    assert "name different journals" in _refused_apart(path, identity)


def test_a_journal_made_readable_by_others_is_closed_to_them_at_open(journal_path: Path) -> None:
    for part in (journal_path, marker_path(journal_path)):
        part.chmod(0o644)
    open_journal(journal_path).close()
    for part in journal_path.parent.iterdir():
        assert part.stat().st_mode & 0o077 == 0, part


# --- the upgrade to series (schema 4 to 5) ----------------------------------------------------------------


def _schema_4_journal(path: Path, results: int, record: int) -> None:
    """A schema-4 journal as the release before series wrote it: ``results`` inputs with one scored result each
    (the first with a report for the PACS), and AUTOINCREMENT's record at ``record`` (above MAX(seq) after a
    recovery, or after results lost)."""
    from appliance.journal import payload
    from tests.journal.old_schemas import SCHEMA_4
    from tests.journal.test_payload import SCORED

    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_4)
        db.execute("PRAGMA user_version = 4")
        for n in range(1, results + 1):
            db.execute(
                "INSERT INTO inputs (source, path, file_name, size, mtime_ns, content_hash, state, created_ms, "
                "updated_ms, instance_uid) VALUES ('dicom', CAST(? AS BLOB), 'a', 10, 1, ?, 'scored', 1, 1, ?)",
                (f"/in/{n}", f"h{n}", f"1.2.{n}"),
            )
            db.execute(
                "INSERT INTO results (input_id, frame_index, outcome, sop_uid, payload, created_ms, payload_version) "
                "VALUES (?, 0, 'scored', ?, ?, 1, 2)",
                (n, f"1.2.{n}", payload.encode(SCORED)),
            )
        if results:
            db.execute(
                "INSERT INTO outbox (result_seq, sop_class_uid, sop_instance_uid, payload, state, next_try_ms, "
                "created_ms, updated_ms) VALUES (1, '1.2.840.10008.5.1.4.1.1.88.22', '2.25.1', x'00', 'pending', 1, "
                "1, 1)"
            )
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'results'")
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('results', ?)", (record,))


@pytest.mark.parametrize("results", [3, 0], ids=["with-results", "all-lost"])
def test_a_schema_4_journal_is_upgraded_keeping_its_results_and_numbering_above_its_record(
    tmp_path: Path, results: int
) -> None:
    from appliance.journal import payload
    from appliance.journal.journal import SCHEMA_VERSION, SeriesEntry
    from tests.journal.test_payload import SCORED

    path = tmp_path / "data" / "journal.sqlite3"
    _schema_4_journal(path, results, record=500)
    j = open_journal(path)
    assert j.issued() == 500
    old = j.results_after(0)
    assert [(s.seq, s.kind) for s in old] == [(n, "image") for n in range(1, results + 1)]
    assert all(s.result() == replace(SCORED, sequence=s.seq) for s in old)
    if results:
        delivery = j.delivery_of(1)
        assert delivery is not None and delivery.sop_instance_uid == "2.25.1"  # its report still waits for the PACS
    # New results, image and series, continue above the record: never a number a terminal may have seen.
    reg = j.register(source="dicom", path="/in/new", file_name="new", size=1, mtime_ns=1, content_hash="new")
    entry = SeriesEntry(SCORED.ids.study_instance_uid, SCORED.ids.series_instance_uid, "", 1, scores={"glioma": 0.75})
    row = NewResult(frame_index=0, outcome="scored", sop_uid="1.2.new", payload=payload.encode(SCORED), series=entry)
    assert j.complete(reg.input.id, [row]) == [501]
    (series_id,) = j.series_due(2**62)
    state = j.series_state(series_id)
    assert state is not None and j.complete_series(state, b"{}") == 502
    j.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT name, seq FROM sqlite_sequence WHERE name LIKE 'results%'").fetchall() == [
            ("results", 502)
        ]
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert check(path) is None
