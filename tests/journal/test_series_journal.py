"""Series in the journal on a real SQLite file: images join their series in the transaction that stores them, a
series is due after its quiet period (or at once where its header says all are in), keeps only its best images,
and its results share the numbering of image results; a late image re-opens it for a revision."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.domain.result import (
    Decision,
    ImageIds,
    InputFacts,
    LabelScore,
    Outcome,
    Rejection,
    Result,
    ScoredBy,
)
from appliance.domain.series import Completion, KeyImage, SeriesResult, key_floors
from appliance.journal import journal as journal_module
from appliance.journal import payload
from appliance.journal.journal import Journal, NewDelivery, NewResult, SeriesEntry
from tests.waiting import eventually

STUDY = "1.2.826.0.1.3680043.10.1"
SERIES = STUDY + ".1"
STABLE_MS = 60_000  # long: nothing is due before the test asks for a time past it
BY = ScoredBy("pipeline-test", "1.0.0", "onnxruntime")
SR = "1.2.840.10008.5.1.4.1.1.88.22"
_inputs = itertools.count()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _tick(after_ms: int) -> int:
    """Wait for the wall clock's millisecond to pass ``after_ms`` (what the journal stamps with): a later image
    gets a later due time."""
    return eventually(_now_ms, "the clock to move on", until=lambda now: now > after_ms, every=0.001)


def _image(
    sop: str, scores: dict[str, float] | None, *, study: str = STUDY, series: str = SERIES, frame: int = 0
) -> Result:
    """An image result as the finisher stores it: scored where ``scores`` are given, else rejected."""
    ids = ImageIds(study, series, sop, "ACC-1")
    facts = InputFacts(0, "dicom", f"{sop}.dcm", "00" * 32, sop)
    if scores is None:
        return Result(facts, BY, Outcome.REJECTED, 1, ids=ids, rejection=Rejection("corrupt_dicom", "Cut short."))
    found = tuple(label for label, v in scores.items() if v >= 0.5)
    return Result(
        facts,
        BY,
        Outcome.SCORED,
        1,
        ids=ids,
        frame_index=frame,
        scores=tuple(LabelScore(label, v) for label, v in scores.items()),
        decision=Decision.POSITIVE if found else Decision.NEGATIVE,
        findings=found,
        threshold=0.5,
    )


def _entry(result: Result, **given: object) -> SeriesEntry:
    ids = result.ids
    scores = {s.label: s.score for s in result.scores} if result.outcome is Outcome.SCORED else None
    fields: dict[str, object] = {"accession": ids.accession_number, "stable_ms": STABLE_MS, "scores": scores}
    fields.update({"kept": 3, **given})
    return SeriesEntry(ids.study_instance_uid, ids.series_instance_uid, **fields)  # type: ignore[arg-type]


def _store(j: Journal, *frames: tuple[Result, SeriesEntry | None]) -> list[int]:
    """One input (its frames) stored in one transaction; returns their sequence numbers."""
    first = frames[0][0]
    name = f"{first.ids.sop_instance_uid}-{next(_inputs)}"
    reg = j.register(source="dicom", path=f"/spool/{name}", file_name=name, size=1, mtime_ns=1, content_hash=name)
    rows = [
        NewResult(r.frame_index, r.outcome.value, r.ids.sop_instance_uid, payload.encode(r), series=entry)
        for r, entry in frames
    ]
    return j.complete(reg.input.id, rows)


def _add(j: Journal, sop: str, scores: dict[str, float] | None, **given: object) -> int:
    """One single-frame image joined to its series; its sequence number."""
    study = str(given.pop("study", STUDY))
    series = str(given.pop("series", SERIES))
    result = _image(sop, scores, study=study, series=series)
    (seq,) = _store(j, (result, _entry(result, **given)))
    return seq


def _open_ids(j: Journal) -> list[int]:
    return j.series_due(2**62)


def _series_id(j: Journal, series_uid: str) -> int:
    """The open series of that UID (in the study STUDY)."""
    (found,) = [i for i in _open_ids(j) if (s := j.series_state(i)) is not None and s.series_uid == series_uid]
    return found


def _only_series(j: Journal) -> int:
    (series_id,) = _open_ids(j)
    return series_id


def _series_result(state_id: int, j: Journal, **given: object) -> SeriesResult:
    """A series result of the series as it stands (what the assembler would make of it)."""
    state = j.series_state(state_id)
    assert state is not None
    live = state.live.series() if state.live is not None else None
    fields: dict[str, object] = {
        "study_instance_uid": state.study_uid,
        "series_instance_uid": state.series_uid,
        "accession_number": state.accession,
        "images_scored": state.scored,
        "images_rejected": state.rejected,
        "scores": (LabelScore("lesion", 0.9),),
        "decision": Decision.POSITIVE,
        "findings": ("lesion",),
        "threshold": 0.5,
        "key_label": "lesion",
        "key_images": tuple(
            KeyImage(c.image.ids.sop_instance_uid, c.image.frame_index, c.image.scores[0].score, c.image.sequence)
            for c in state.candidates
        ),
        "scored_by": BY,
        "combine": "max",
        "completion": Completion(state.completion),
        "revision": state.revision + 1,
        "created_unix_ms": _now_ms(),
        "first_image_unix_ms": state.first_ms,
        "last_image_unix_ms": state.last_ms,
        "revises_sequence": live.sequence if live else 0,
        "revises_report_uid": live.report_uid if live else "",
        **given,
    }
    return SeriesResult(**fields)  # type: ignore[arg-type]


def _complete(j: Journal, series_id: int, *deliveries: NewDelivery, **given: object) -> int:
    state = j.series_state(series_id)
    assert state is not None
    seq = j.complete_series(state, payload.encode_series(_series_result(series_id, j, **given)), deliveries)
    assert seq is not None
    return seq


def _rows(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


# --- joining ----------------------------------------------------------------------------------------


def test_images_of_one_series_make_one_open_series_and_other_series_their_own(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", {"lesion": 0.2})
    _add(j, "1.2", {"lesion": 0.3})
    assert j.open_series() == 1
    _add(j, "2.1", {"lesion": 0.4}, series=SERIES + ".2")  # another series of the study
    _add(j, "3.1", {"lesion": 0.5}, study=STUDY + ".9")  # the same series UID in another study: not the same series
    _add(j, "1.3", {"lesion": 0.6})
    assert j.open_series() == 3
    states = [j.series_state(i) for i in _open_ids(j)]
    assert sorted((s.study_uid, s.series_uid, s.scored) for s in states if s is not None) == [
        (STUDY, SERIES, 3),
        (STUDY, SERIES + ".2", 1),
        (STUDY + ".9", SERIES, 1),
    ]
    # An image without a series (a PNG, a DICOM without UIDs) stands alone: its row has no series.
    plain = _image("", {"lesion": 0.9}, study="", series="")
    (seq,) = _store(j, (plain, None))
    assert j.open_series() == 3
    assert _rows(tmp_path / "j.sqlite3", "SELECT series_id FROM results WHERE seq = ?", seq) == [(None,)]
    j.close()


def test_the_accession_comes_from_the_first_image_that_names_one(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", {"lesion": 0.2}, accession="")
    _add(j, "1.2", {"lesion": 0.2}, accession="ACC-7")
    _add(j, "1.3", {"lesion": 0.2}, accession="ACC-8")
    state = j.series_state(_only_series(j))
    assert state is not None and state.accession == "ACC-7"
    j.close()


# --- the quiet period -----------------------------------------------------------------------------------


def test_a_series_is_due_a_quiet_period_after_its_last_image_and_each_image_pushes_that_on(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    before = _now_ms()
    _add(j, "1.1", {"lesion": 0.2})
    series_id = _only_series(j)
    first = j.series_state(series_id)
    assert first is not None and first.state == "open" and first.completion == "stable"
    assert first.due_ms == first.last_ms + STABLE_MS and first.last_ms >= before
    assert j.next_series_due_ms() == first.due_ms
    assert j.series_due(first.due_ms - 1) == [] and j.series_due(first.due_ms) == [series_id]
    _tick(first.last_ms)
    _add(j, "1.2", {"lesion": 0.3})
    second = j.series_state(series_id)
    assert second is not None and second.due_ms == second.last_ms + STABLE_MS and second.due_ms > first.due_ms
    assert second.first_ms == first.first_ms
    assert j.series_due(first.due_ms) == []  # no longer due when the first image's quiet period ends
    assert j.next_series_due_ms() == second.due_ms
    j.close()


def test_a_result_made_before_the_last_image_is_not_stored(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", {"lesion": 0.2}, material=(b"header", b"display"))
    series_id = _only_series(j)
    read = j.series_state(series_id)
    assert read is not None
    stale = payload.encode_series(_series_result(series_id, j))
    _tick(read.last_ms)
    _add(j, "1.2", {"lesion": 0.3})  # came while the result was being made
    last = j.last_sequence()
    assert j.complete_series(read, stale, (NewDelivery(SR, "2.25.1", b"sr"),)) is None
    assert j.last_sequence() == last and j.open_series() == 1
    now = j.series_state(series_id)
    assert now is not None and now.state == "open" and now.revision == 0 and now.live is None
    assert j.outbox_depth() == (0, None)
    assert [c.display for c in now.candidates] == [b"display", None]  # nothing let go
    j.close()


def test_a_series_postponed_is_due_later_unless_an_image_came_meanwhile(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", {"lesion": 0.2})
    series_id = _only_series(j)
    state = j.series_state(series_id)
    assert state is not None
    j.postpone_series(series_id, state.due_ms + 5_000, state)
    assert j.next_series_due_ms() == state.due_ms + 5_000
    j.postpone_series(series_id, state.due_ms + 9_000, state)  # read before the postponement: stale
    assert j.next_series_due_ms() == state.due_ms + 5_000
    later = j.series_state(series_id)
    assert later is not None
    _tick(later.last_ms)
    _add(j, "1.2", {"lesion": 0.3})
    j.postpone_series(series_id, later.due_ms + 60_000, later)  # an image came since: its quiet period stands
    now = j.series_state(series_id)
    assert now is not None and now.due_ms == now.last_ms + STABLE_MS
    j.close()


def test_a_result_read_in_the_same_millisecond_as_a_later_image_is_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock cannot tell the read from the image: the series' count of joined images does."""
    monkeypatch.setattr(journal_module, "_now_ms", lambda: 1_700_000_000_000)
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", {"lesion": 0.2})
    series_id = _only_series(j)
    read = j.series_state(series_id)
    assert read is not None
    _add(j, "1.2", {"lesion": 0.9})
    after = j.series_state(series_id)
    assert after is not None and (after.due_ms, after.last_ms) == (read.due_ms, read.last_ms)
    assert j.complete_series(read, payload.encode_series(_series_result(series_id, j))) is None
    assert j.open_series() == 1
    assert j.complete_series(after, payload.encode_series(_series_result(series_id, j))) is not None
    j.close()


# --- the header says all are in -------------------------------------------------------------------------


def test_images_in_acquisition_reached_makes_the_series_due_at_once(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", {"lesion": 0.2}, expected=3)
    _add(j, "1.2", None, expected=3)  # a rejected image is in too
    series_id = _only_series(j)
    waiting = j.series_state(series_id)
    assert waiting is not None and waiting.completion == "stable" and waiting.due_ms == waiting.last_ms + STABLE_MS
    _add(j, "1.3", {"lesion": 0.4}, expected=3)
    done = j.series_state(series_id)
    assert done is not None and done.completion == "header" and done.due_ms == done.last_ms
    assert j.series_due(_now_ms()) == [series_id]
    j.close()


def test_a_multi_frame_instance_in_one_transaction_makes_its_series_due_at_once(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    frames = [_image("1.1", {"lesion": 0.1 * n}, frame=n) for n in range(4)]
    seqs = _store(j, *((r, _entry(r, expected=4)) for r in frames))
    assert seqs == [1, 2, 3, 4]
    series_id = _only_series(j)
    state = j.series_state(series_id)
    assert state is not None and state.completion == "header" and state.scored == 4
    assert j.series_due(_now_ms()) == [series_id]
    assert sorted(c.image.frame_index for c in state.candidates) == [1, 2, 3]  # the best three of four
    j.close()


# --- the best images kept -------------------------------------------------------------------------------


def test_only_the_best_images_per_label_stay_candidates(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    rng = random.Random(21)
    scores = {f"1.{n}": {"lesion": rng.random(), "cyst": rng.random()} for n in range(40)}
    for sop in rng.sample(sorted(scores), len(scores)):
        _add(j, sop, scores[sop], kept=2)
    state = j.series_state(_only_series(j))
    assert state is not None and state.scored == 40
    best = {
        label: sorted(scores, key=lambda sop, label=label: -scores[sop][label])[:2]  # type: ignore[misc]
        for label in ("lesion", "cyst")
    }
    assert {c.image.ids.sop_instance_uid for c in state.candidates} == set(best["lesion"]) | set(best["cyst"])
    floors = key_floors(j.key_scores(STUDY, SERIES), 2)
    assert floors == {label: scores[best[label][1]][label] for label in ("lesion", "cyst")}
    j.close()


def test_key_floors_are_minus_infinity_until_the_series_has_enough_images(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    assert key_floors(j.key_scores(STUDY, SERIES), 3) == {}  # no series yet
    _add(j, "1.1", {"lesion": 0.7})
    _add(j, "1.2", {"lesion": 0.2})
    assert key_floors(j.key_scores(STUDY, SERIES), 3) == {"lesion": float("-inf")}
    _add(j, "1.3", {"lesion": 0.4})
    _add(j, "1.4", {"lesion": 0.1})
    assert key_floors(j.key_scores(STUDY, SERIES), 3) == {"lesion": 0.2}
    assert key_floors(j.key_scores(STUDY, SERIES + ".2"), 3) == {}  # another series knows nothing of these
    j.close()


def test_material_is_kept_where_given_and_its_display_let_go_once_the_series_is_complete(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", {"lesion": 0.9}, material=(b"h1", b"d1"))
    _add(j, "1.2", {"lesion": 0.8}, material=(b"h2", None))  # no display frame for it
    _add(j, "1.3", {"lesion": 0.7})  # none asked for
    series_id = _only_series(j)
    state = j.series_state(series_id)
    assert state is not None
    assert [(c.image.ids.sop_instance_uid, c.header, c.display) for c in state.candidates] == [
        ("1.1", b"h1", b"d1"),
        ("1.2", b"h2", None),
        ("1.3", None, None),
    ]
    _complete(j, series_id)
    assert j.series_state(series_id) is not None
    after = j.series_state(series_id)
    assert after is not None and [(c.header, c.display) for c in after.candidates] == [
        (b"h1", None),
        (b"h2", None),
        (None, None),
    ]
    j.close()


def test_a_rejected_image_counts_but_is_never_a_candidate(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    _add(j, "1.1", None)
    _add(j, "1.2", {"lesion": 0.1})
    _add(j, "1.3", None)
    state = j.series_state(_only_series(j))
    assert state is not None and (state.scored, state.rejected) == (1, 2)
    assert [c.image.ids.sop_instance_uid for c in state.candidates] == ["1.2"]
    j.close()


# --- series results: numbering, revisions ---------------------------------------------------------------


def test_series_results_share_the_numbering_of_image_results(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    assert [_add(j, f"1.{n}", {"lesion": 0.1 * n}) for n in range(3)] == [1, 2, 3]
    plain = _image("", {"lesion": 0.9}, study="", series="")
    assert _store(j, (plain, None)) == [4]
    series_id = _only_series(j)
    assert _complete(j, series_id, NewDelivery(SR, "2.25.77", b"sr"), report_uid="2.25.77") == 5
    assert _add(j, "9.1", {"lesion": 0.5}, series=SERIES + ".9") == 6
    stored = j.results_after(0)
    kinds = ["image"] * 4 + ["series", "image"]
    assert [(s.seq, s.kind) for s in stored] == list(zip(range(1, 7), kinds, strict=True))
    assert [s.seq for s in j.results_after(4, limit=1)] == [5]
    series = stored[4]
    assert series.input_id is None and series.outcome == "series"
    back = series.series()
    assert back.sequence == 5 and back.series_instance_uid == SERIES and back.images_scored == 3
    assert [k.sequence for k in back.key_images] == [1, 2, 3]
    with pytest.raises(ValueError, match="series result"):
        series.result()
    with pytest.raises(ValueError, match="image result"):
        stored[0].series()
    assert j.last_sequence() == 6 and j.open_series() == 1
    found = j.series_result(SERIES)
    assert found is not None and found.seq == 5
    assert j.series_result(SERIES + ".9") is None  # open, no result yet
    delivery = j.delivery_of(5)
    assert delivery is not None and delivery.sop_instance_uid == "2.25.77"
    assert j.counts().scored == 5 and j.counts().last_sequence == 6  # a series result is no scored image
    j.close()


def test_a_late_image_reopens_the_series_and_its_next_result_is_the_one_live(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path)
    _add(j, "1.1", {"lesion": 0.3})
    series_id = _only_series(j)
    first = _complete(j, series_id, NewDelivery(SR, "2.25.1", b"sr"), report_uid="2.25.1")
    assert j.open_series() == 0 and j.series_due(2**62) == []
    closed = j.series_state(series_id)
    assert closed is not None and closed.state == "complete" and closed.revision == 1
    assert closed.live is not None and closed.live.seq == first
    _tick(closed.last_ms)
    _add(j, "1.2", {"lesion": 0.8})
    reopened = j.series_state(series_id)
    assert reopened is not None and reopened.state == "open" and reopened.completion == "stable"
    assert reopened.due_ms == reopened.last_ms + STABLE_MS and (reopened.scored, reopened.revision) == (2, 1)
    assert j.open_series() == 1
    live = j.series_result(SERIES)
    assert live is not None and live.seq == first  # the first stands until its revision is stored
    second = _complete(j, series_id, NewDelivery(SR, "2.25.2", b"sr"), report_uid="2.25.2")
    revised = j.series_result(SERIES)
    assert revised is not None and revised.seq == second
    result = revised.series()
    assert (result.revision, result.revises_sequence, result.revises_report_uid) == (2, first, "2.25.1")
    assert _rows(path, "SELECT COUNT(*), live_seq FROM series") == [(1, second)]  # never two live
    assert [s.kind for s in j.results_after(0)].count("series") == 2  # the first stays on the stream
    j.close()


def test_a_series_result_is_not_stored_above_the_reserve(tmp_path: Path) -> None:
    """A series result's number is reserved outside the journal before it is committed, as an image's is; a
    reserve that cannot be raised stores nothing and leaves the series open."""

    class Reserve:
        def __init__(self) -> None:
            self.top = 2
            self.fail = False
            self.raised: list[int] = []

        def ceiling(self) -> int:
            return self.top

        def reserve(self, top: int, committed: int) -> None:
            if self.fail:
                raise OSError(28, "No space left on device")
            self.raised.append(top)
            self.top = top + 2

        def closed(self, committed: int) -> None:
            pass

    reserve = Reserve()
    j = Journal(tmp_path / "j.sqlite3", reserve=reserve)
    _add(j, "1.1", {"lesion": 0.3}, material=(b"h", b"d"))
    _add(j, "1.2", {"lesion": 0.4})
    series_id = _only_series(j)
    reserve.fail = True
    state = j.series_state(series_id)
    assert state is not None
    with pytest.raises(OSError):
        j.complete_series(state, payload.encode_series(_series_result(series_id, j)))
    assert j.last_sequence() == 2 and j.open_series() == 1
    kept = j.series_state(series_id)
    assert kept is not None and kept.due_ms == state.due_ms and kept.candidates[0].display == b"d"
    reserve.fail = False
    assert _complete(j, series_id) == 3
    assert reserve.raised == [3]
    j.close()


# --- a restart ------------------------------------------------------------------------------------------


def test_a_restart_gives_open_series_a_whole_quiet_period_but_not_those_whose_header_said_all_are_in(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path)
    _add(j, "1.1", {"lesion": 0.2}, stable_ms=1)  # due at once: its result was not made before the stop
    _add(j, "2.1", {"lesion": 0.2}, series=SERIES + ".2", expected=1)
    _add(j, "3.1", {"lesion": 0.2}, series=SERIES + ".3")
    _add(j, "4.1", {"lesion": 0.2}, series=SERIES + ".4", expected=1)
    complete = _series_id(j, SERIES + ".4")
    assert _complete(j, complete) == 5
    j.close()
    j = Journal(path)
    by_uid = {s.series_uid: s for s in (j.series_state(i) for i in _open_ids(j)) if s is not None}
    now = _now_ms()
    assert j.restart_series_clocks(now, 30_000) == 3  # open ones
    after = {uid: j.series_state(s.id) for uid, s in by_uid.items()}
    assert {uid: (s.due_ms if s else None) for uid, s in after.items()} == {
        SERIES: now + 30_000,  # waits again, for its images still queued
        SERIES + ".2": by_uid[SERIES + ".2"].due_ms,  # all in: due as it was
        SERIES + ".3": by_uid[SERIES + ".3"].due_ms,  # already due later than that
    }
    final = j.series_state(complete)
    assert final is not None and final.state == "complete" and final.live is not None and final.live.seq == 5
    j.close()


# --- the payload ----------------------------------------------------------------------------------------


def test_a_series_result_reads_back_as_it_was_written_with_its_sequence() -> None:
    result = SeriesResult(
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        accession_number="ACC-ü",
        images_scored=40,
        images_rejected=2,
        scores=(LabelScore("lesion", 0.875), LabelScore("cyst", 0.125)),
        decision=Decision.POSITIVE,
        findings=("lesion",),
        threshold=0.5,
        key_label="lesion",
        key_images=(KeyImage("1.2.3", 0, 0.875, 17), KeyImage("1.2.4", 2, 0.75, 9)),
        scored_by=BY,
        combine="mean of top 3",
        completion=Completion.HEADER,
        revision=2,
        created_unix_ms=1_790_000_000_000,
        first_image_unix_ms=1_789_999_000_000,
        last_image_unix_ms=1_789_999_990_000,
        revises_sequence=12,
        report_uid="2.25.5",
        revises_report_uid="2.25.4",
    )
    back = payload.decode_series(payload.encode_series(result), payload.VERSION, 99)
    assert back == replace(result, sequence=99)
    empty = replace(result, key_images=(), findings=(), decision=Decision.NEGATIVE, revises_sequence=0)
    assert payload.decode_series(payload.encode_series(empty), payload.VERSION, 1) == replace(empty, sequence=1)
    assert json.loads(payload.encode_series(result))["completion"] == "header"
    with pytest.raises(ValueError, match="payload version 1"):
        payload.decode_series(payload.encode_series(result), 1, 99)
