"""Series assembly in-process, on a real journal with the pipeline-test manifest: the real finisher stores each
DICOM image's result into its series (as the batcher hands its frames over), and the real assembler completes each
series once due, combining its images' scores as the manifest's [series] says; a late image revises its result."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from appliance.config import PacsConfig
from appliance.delivery.reports import Reports
from appliance.domain.errors import CorruptDicom, FileVanished, InferenceFailed
from appliance.domain.faults import Faults
from appliance.domain.manifest import Manifest, Series, load_manifest
from appliance.domain.result import Decision, InputFacts, LabelScore, Outcome, Result
from appliance.domain.series import (
    Completion,
    ImageScores,
    KeyImage,
    SeriesResult,
    key_floors,
    key_label,
    per_label,
)
from appliance.imaging.types import ImageMeta
from appliance.inference.batcher import BatchTiming, Row
from appliance.inference.postprocess import decide
from appliance.journal import payload
from appliance.journal.journal import Journal
from appliance.prepare.preparer import Prepared
from appliance.scoring.admission import Admission
from appliance.scoring.finisher import Finisher
from appliance.scoring.job import Job, Scorer
from appliance.scoring.observer import NoObserver
from appliance.scoring.results import TRANSIENT_CODES, build_results
from appliance.scoring.series import RETRY_S, SeriesAssembler, combine, entry_for
from tests.delivery.test_sr import DEVICE
from tests.in_process import in_process_config
from tests.integration.conftest import TEST_MODEL
from tests.waiting import eventually

MANIFEST = load_manifest(TEST_MODEL).manifest  # one label, "lesion"; threshold rule at 0.5
STUDY = "1.2.826.0.1.3680043.10.2"
SERIES = STUDY + ".1"
QUIET_S = 0.001  # due a millisecond after its last image: a test completes a series when it asks the assembler to
LONG_S = 60.0  # never due within a test but for its header

Given = float | tuple[float, ...] | BaseException  # a frame's scores (one per label), or what stopped it


def _with(manifest: Manifest, **series: object) -> Manifest:
    return manifest.model_copy(update={"series": Series.model_validate(series)})


def _argmax() -> Manifest:
    """The pipeline-test manifest with a second, negative label, decided by argmax."""
    raw = MANIFEST.model_dump()
    raw["output"]["labels"] = ["lesion", "clear"]
    raw["decision"] = {"rule": "argmax", "threshold": 0.5, "negative_labels": ["clear"]}
    return Manifest.model_validate(raw)


class Line:
    """The end of the daemon's stages: the real finisher storing what the batcher gave for each input's frames into a
    real journal, and the series assembler over that journal."""

    def __init__(self, tmp_path: Path, stable_s: float, manifest: Manifest, reports: Reports | None = None) -> None:
        self.config = in_process_config(tmp_path)
        self.spool = tmp_path / "spool"
        self.spool.mkdir(exist_ok=True)
        self.journal = Journal(tmp_path / "journal.sqlite3")
        self.scorer = Scorer(manifest, "onnxruntime")
        self.admission = Admission(64, lambda _count: None)
        self.finisher = Finisher(
            self.journal,
            self.config.watch,
            self.admission,
            NoObserver(),
            lambda: self.scorer,
            Faults(),
            reports,
            stable_s,
        )
        self.finisher.start()
        self.stable_s = stable_s
        self._names = 0

    def assembler(self) -> SeriesAssembler:
        return SeriesAssembler(self.journal, self.stable_s, lambda: self.scorer, None)

    def store(
        self,
        sop: str,
        *frames: Given,
        study: str = STUDY,
        series: str = SERIES,
        source_format: str = "dicom",
        in_acquisition: int = 0,
    ) -> list[Result]:
        """One input whose frames came out of the batcher as given; its results as stored, numbered."""
        self._names += 1
        name = f"{self._names:04d}.dcm"
        path = self.spool / name
        path.write_bytes(b"DICM")
        facts = InputFacts(0, "dicom", name, f"{self._names:064x}", sop)
        reg = self.journal.register(
            source="dicom", path=str(path), file_name=name, size=4, mtime_ns=1, content_hash=facts.content_hash
        )
        facts = replace(facts, input_id=reg.input.id)
        dicom = source_format == "dicom"
        meta = ImageMeta(
            source_format,
            study if dicom else "",
            series if dicom else "",
            sop if dicom else "",
            "ACC-1" if dicom else "",
            images_in_acquisition=in_acquisition,
        )
        answer: Future[list[Result]] = Future()
        job = Job(facts=facts, path=path, future=answer, prepared=Prepared((), meta, 0.0, 0.0))
        timing = BatchTiming(0.0, 0.0, len(frames), scored_by=self.scorer)
        for frame in frames:
            if isinstance(frame, BaseException):
                job.frames.append((None, frame, timing))
            else:
                values = frame if isinstance(frame, tuple) else (frame,)
                job.frames.append((Row(np.array(values, dtype=np.float64)), None, timing))
        self.admission.admit()
        self.admission.arrived()
        self.finisher.put(job)
        return answer.result(timeout=60)

    def series_id(self, series: str = SERIES, study: str = STUDY) -> int:
        row = (
            self.journal._reader()
            .execute("SELECT id FROM series WHERE study_uid = ? AND series_uid = ?", (study, series))
            .fetchone()
        )
        assert row is not None, "no such series"
        return int(row[0])

    def live(self, series: str = SERIES) -> SeriesResult:
        stored = self.journal.series_result(series)
        assert stored is not None and stored.kind == "series"
        return stored.series()

    def series_results(self) -> list[SeriesResult]:
        return [s.series() for s in self.journal.results_after(0, limit=10_000) if s.kind == "series"]


@contextmanager
def _line(
    tmp_path: Path, stable_s: float = QUIET_S, manifest: Manifest = MANIFEST, reports: Reports | None = None
) -> Iterator[Line]:
    line = Line(tmp_path, stable_s, manifest, reports)
    try:
        yield line
    finally:
        line.finisher.stop()
        line.journal.close()


def _complete(assembler: SeriesAssembler, count: int = 1) -> None:
    """Complete ``count`` series, each due once its (short) quiet period is over."""
    done = 0

    def more() -> int:
        nonlocal done
        done += assembler.complete_due()
        return done

    eventually(more, f"{count} series complete", until=lambda n: n >= count, every=0.005)
    assert done == count


# --- joining --------------------------------------------------------------------------------------------


def test_dicom_images_join_their_series_and_other_inputs_stand_alone(tmp_path: Path) -> None:
    with _line(tmp_path, LONG_S) as line:
        line.store("1.1", 0.2)
        line.store("1.2", 0.7)
        line.store("1.3", CorruptDicom("The header is cut short."))  # rejected for its content: counts
        vanished = line.store("1.4", FileVanished("The file went away."))  # says nothing of the image: retried
        failed = line.store("1.5", InferenceFailed("The backend failed."))
        line.store("2.1", 0.4, series=SERIES + ".2")
        line.store("3.1", 0.9, study=STUDY + ".9")  # its series UID, in another study
        (png,) = line.store("", 0.95, source_format="png")
        assert line.journal.open_series() == 3
        state = line.journal.series_state(line.series_id())
        assert state is not None and (state.scored, state.rejected) == (2, 1)
        assert sorted(c.image.ids.sop_instance_uid for c in state.candidates) == ["1.1", "1.2"]
        for transient in (vanished, failed):
            assert transient[0].rejection is not None and transient[0].rejection.code in TRANSIENT_CODES
        # Each stored, streamed and answered as before; only their series knows nothing of them.
        assert [r.outcome for r in vanished + failed + [png]] == [Outcome.REJECTED, Outcome.REJECTED, Outcome.SCORED]
        assert entry_for(png, MANIFEST, LONG_S, None, {}) is None
        assert entry_for(replace(png, ids=replace(png.ids, study_instance_uid=STUDY)), MANIFEST, 1, None, {}) is None
        other = line.journal.series_state(line.series_id(SERIES, STUDY + ".9"))
        assert other is not None and other.scored == 1


class CountingReports(Reports):
    """The real reports for the PACS, per series, counting the frames whose material they are asked to keep."""

    def __init__(self) -> None:
        super().__init__(PacsConfig(enabled=True), DEVICE)
        self.asked: list[tuple[str, int]] = []

    def key_material(
        self, input_id: int, path: Path, result: Result, display: np.ndarray | None
    ) -> tuple[bytes, bytes | None] | None:
        self.asked.append((result.ids.sop_instance_uid, result.frame_index))
        return super().key_material(input_id, path, result, display)


def test_a_multi_frame_instance_keeps_material_only_for_frames_that_may_become_key_images(tmp_path: Path) -> None:
    """The floors move with each frame of one instance (and each instance of one group), not only with what the
    journal had before it: a 40-frame instance best first asks for its first three frames' material only."""
    reports = CountingReports()
    with _line(tmp_path, LONG_S, reports=reports) as line:
        kept = MANIFEST.series.kept
        assert kept == 3
        line.store("1.1", *(0.9 - 0.01 * i for i in range(40)))
        assert reports.asked == [("1.1", 0), ("1.1", 1), ("1.1", 2)]
        line.store("1.2", 0.95)  # beats the third best (0.88)
        line.store("1.3", 0.1, 0.2)  # beats nothing
        assert reports.asked[3:] == [("1.2", 0)]
        state = line.journal.series_state(line.series_id())
        assert state is not None and state.scored == 43
        best = sorted((c.image.ids.sop_instance_uid, c.image.frame_index) for c in state.candidates)
        assert best == [("1.1", 0), ("1.1", 1), ("1.2", 0)]


def test_material_is_asked_for_only_where_an_image_may_become_a_key_image() -> None:
    asked: list[str] = []

    def material(sop: str) -> tuple[bytes, bytes | None]:
        asked.append(sop)
        return b"header-" + sop.encode(), None

    result = build_results(
        InputFacts(1, "dicom", "a.dcm", "0" * 64, "1.1"),
        Prepared((), ImageMeta("dicom", STUDY, SERIES, "1.1", "ACC-1", images_in_acquisition=40), 0.0, 0.0),
        [(Row(np.array([0.6])), None, BatchTiming(0.0, 0.0, 1, scored_by=Scorer(MANIFEST, "onnxruntime")))],
        time.perf_counter(),
        Scorer(MANIFEST, "onnxruntime"),
    )[0]
    beaten = entry_for(result, MANIFEST, 30.0, lambda: material("beats"), {"lesion": 0.5})
    assert beaten is not None and beaten.material == (b"header-beats", None)
    assert (beaten.stable_ms, beaten.expected, beaten.kept, beaten.scores) == (30_000, 40, 3, {"lesion": 0.6})
    assert (beaten.study_uid, beaten.series_uid, beaten.accession) == (STUDY, SERIES, "ACC-1")
    under = entry_for(result, MANIFEST, 30.0, lambda: material("under"), {"lesion": 0.6})  # a tie is not better
    assert under is not None and under.material is None and under.scores == {"lesion": 0.6}
    first = entry_for(result, MANIFEST, 30.0, lambda: material("first"), {})  # the series' first image
    assert first is not None and first.material is not None
    no_reports = entry_for(result, MANIFEST, 30.0, None, {})
    assert no_reports is not None and no_reports.material is None
    rejected = replace(result, outcome=Outcome.REJECTED, scores=())
    refused = entry_for(rejected, MANIFEST, 30.0, lambda: material("rejected"), {})
    assert refused is not None and refused.scores is None and refused.material is None
    assert asked == ["beats", "first"]


# --- the quiet period and the header ----------------------------------------------------------------------


def test_a_series_is_not_completed_before_its_quiet_period_is_over(tmp_path: Path) -> None:
    with _line(tmp_path, LONG_S) as line:
        line.store("1.1", 0.9)
        assembler = line.assembler()
        assert assembler.complete_due() == 0
        assert line.journal.open_series() == 1 and line.series_results() == []
        state = line.journal.series_state(line.series_id())
        assert state is not None and state.due_ms == state.last_ms + round(LONG_S * 1000)


def test_a_multi_frame_instance_completes_its_series_at_once(tmp_path: Path) -> None:
    with _line(tmp_path, LONG_S) as line:
        line.store("1.1", 0.2, 0.8, CorruptDicom("Frame 3 is cut short."), 0.6)
        assert line.assembler().complete_due() == 1  # its header said all are in: no quiet period
        result = line.live()
        assert (result.completion, result.images_scored, result.images_rejected) == (Completion.HEADER, 3, 1)
        assert [(k.sop_instance_uid, k.frame_index, k.score) for k in result.key_images] == [
            ("1.1", 1, 0.8),
            ("1.1", 3, 0.6),
            ("1.1", 0, 0.2),
        ]
        assert line.journal.open_series() == 0


def test_images_in_acquisition_reached_completes_the_series_at_once(tmp_path: Path) -> None:
    with _line(tmp_path, LONG_S) as line:
        assembler = line.assembler()
        line.store("1.1", 0.2, in_acquisition=3)
        line.store("1.2", 0.3, in_acquisition=3)
        assert assembler.complete_due() == 0
        line.store("1.3", 0.4, in_acquisition=3)
        assert assembler.complete_due() == 1
        result = line.live()
        assert result.completion is Completion.HEADER and result.images_scored == 3


# --- combining --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "scores", "series_score", "decision"),
    [
        ({}, [0.2, 0.7, 0.4], 0.7, Decision.POSITIVE),
        ({}, [0.2, 0.49, 0.4], 0.49, Decision.NEGATIVE),
        ({"combine": "top_k_mean", "top_k": 3}, [0.1, 0.9, 0.6, 0.3], 0.6, Decision.POSITIVE),
        ({"combine": "top_k_mean", "top_k": 3}, [0.9, 0.2, 0.3, 0.1], (0.9 + 0.3 + 0.2) / 3, Decision.NEGATIVE),
        ({"combine": "top_k_mean", "top_k": 3}, [0.9, 0.7], 0.8, Decision.POSITIVE),  # fewer than k: their mean
        ({"combine": "at_least", "at_least": 2}, [0.9, 0.4, 0.3], 0.4, Decision.NEGATIVE),
        ({"combine": "at_least", "at_least": 2}, [0.1, 0.6, 0.9], 0.6, Decision.POSITIVE),
        ({"combine": "at_least", "at_least": 2}, [0.5, 0.5], 0.5, Decision.POSITIVE),  # at the threshold
        ({"combine": "at_least", "at_least": 2}, [0.99], 0.0, Decision.NEGATIVE),  # one image cannot be two
    ],
    ids=["max", "max-negative", "top3", "top3-negative", "top3-of-2", "at-least-2-no", "at-least-2", "at-edge", "one"],
)
def test_a_series_score_combines_its_images_as_the_manifest_says(
    tmp_path: Path, rule: dict[str, object], scores: list[float], series_score: float, decision: Decision
) -> None:
    manifest = _with(MANIFEST, **rule)
    with _line(tmp_path, manifest=manifest) as line:
        for n, score in enumerate(scores):
            line.store(f"1.{n}", score)
        _complete(line.assembler())
        result = line.live()
        ((label, value),) = [(s.label, s.score) for s in result.scores]
        assert label == "lesion" and value == pytest.approx(series_score)
        assert result.decision is decision and result.threshold == 0.5
        assert result.findings == (("lesion",) if decision is Decision.POSITIVE else ())
        assert result.combine == manifest.series.describe() and result.key_label == "lesion"
        assert [k.score for k in result.key_images] == sorted(scores, reverse=True)[:3]
        assert result.scored_by == line.scorer.scored_by and result.images_scored == len(scores)


def test_at_least_n_is_positive_exactly_when_n_images_reach_the_threshold() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 5):
        manifest = _with(MANIFEST, combine="at_least", at_least=n)
        for _ in range(200):
            scores = [rng.choice([rng.random(), 0.5, 0.4999]) for _ in range(rng.randint(0, 8))]
            images = [ImageScores(i, f"1.{i}", 0, {"lesion": s}) for i, s in enumerate(scores)]
            series = per_label(images, ["lesion"], "at_least", manifest.series.k)
            decided = decide(np.array([s.score for s in series]), manifest)
            positive = sum(s >= 0.5 for s in scores) >= n
            assert (decided.decision is Decision.POSITIVE) == positive, (n, scores)


@pytest.mark.parametrize(
    ("images", "decision", "findings", "score"),
    [
        ([(0.8, 0.2), (0.3, 0.9)], Decision.NEGATIVE, ("clear",), (0.8, 0.9)),  # the negative label tops
        ([(0.9, 0.1), (0.6, 0.4)], Decision.POSITIVE, ("lesion",), (0.9, 0.4)),
        ([(0.3, 0.2), (0.4, 0.1)], Decision.INDETERMINATE, ("lesion",), (0.4, 0.2)),  # nothing reaches 0.5
    ],
    ids=["negative", "positive", "indeterminate"],
)
def test_an_argmax_manifest_decides_on_the_series_scores_and_shows_the_images_nearest_a_finding(
    tmp_path: Path,
    images: list[tuple[float, float]],
    decision: Decision,
    findings: tuple[str, ...],
    score: tuple[float, float],
) -> None:
    with _line(tmp_path, manifest=_argmax()) as line:
        seqs = [line.store(f"1.{n}", scores)[0].sequence for n, scores in enumerate(images)]
        _complete(line.assembler())
        result = line.live()
        assert [(s.label, s.score) for s in result.scores] == [("lesion", score[0]), ("clear", score[1])]
        assert (result.decision, result.findings) == (decision, findings)
        # Negative or not, the key images are those nearest to a finding: the best for the label that is one.
        assert result.key_label == "lesion"
        ranked = sorted(zip(images, seqs, strict=True), key=lambda item: -item[0][0])
        assert [(k.score, k.sequence) for k in result.key_images] == [(s[0], seq) for s, seq in ranked]


def test_the_key_label_is_the_top_finding_else_the_top_label_that_is_no_negative() -> None:
    scores = (LabelScore("glioma", 0.3), LabelScore("meningioma", 0.6), LabelScore("notumor", 0.9))
    assert key_label(scores, ("notumor",), ("notumor",)) == "meningioma"
    assert key_label(scores, ("glioma", "meningioma"), ("notumor",)) == "meningioma"
    assert key_label(scores, ("glioma",), ("notumor",)) == "glioma"
    assert key_label(scores, (), ()) == "notumor"
    assert key_label(scores, (), ("glioma", "meningioma", "notumor")) == "notumor"  # all negative: the top


# --- the key images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [{}, {"combine": "at_least", "at_least": 4, "key_images": 2}, {"combine": "top_k_mean", "key_images": 6}],
    ids=["max", "at-least-4-keep-2", "top3-keep-6"],
)
def test_the_key_images_are_the_true_best_of_many_in_any_order(tmp_path: Path, rule: dict[str, object]) -> None:
    manifest = _with(MANIFEST, **rule)
    rng = random.Random(2026)
    scores = {f"1.{n}": round(rng.random(), 6) for n in range(40)}
    with _line(tmp_path, manifest=manifest) as line:
        seqs = {}
        for sop in rng.sample(sorted(scores), len(scores)):
            (stored,) = line.store(sop, scores[sop])
            seqs[sop] = stored.sequence
        kept = manifest.series.kept
        best = sorted(scores, key=lambda sop: (-scores[sop], seqs[sop]))
        floor = scores[best[kept - 1]]
        assert key_floors(line.journal.key_scores(STUDY, SERIES), kept) == {"lesion": floor}
        state = line.journal.series_state(line.series_id())
        assert state is not None and sorted(c.image.ids.sop_instance_uid for c in state.candidates) == sorted(
            best[:kept]
        )
        _complete(line.assembler())
        result = line.live()
        count = manifest.series.key_images
        assert result.key_images == tuple(KeyImage(sop, 0, scores[sop], seqs[sop]) for sop in best[:count])
        ranked = sorted(scores.values(), reverse=True)
        expected = {
            "max": ranked[0],
            "at_least": ranked[manifest.series.at_least - 1],
            "top_k_mean": sum(ranked[: manifest.series.top_k]) / manifest.series.top_k,
        }[manifest.series.combine]
        ((label, value),) = [(s.label, s.score) for s in result.scores]
        assert label == "lesion" and value == pytest.approx(expected) and result.images_scored == 40


def test_rejected_images_are_counted_and_never_key_images(tmp_path: Path) -> None:
    with _line(tmp_path) as line:
        line.store("1.1", CorruptDicom("Cut short."))
        line.store("1.2", 0.3)
        line.store("1.3", CorruptDicom("Cut short."))
        line.store("1.4", 0.1)
        line.store("1.5", CorruptDicom("Cut short."))
        _complete(line.assembler())
        result = line.live()
        assert (result.images_scored, result.images_rejected) == (2, 3)
        assert [k.sop_instance_uid for k in result.key_images] == ["1.2", "1.4"]  # fewer than three: no others
        assert result.scores == (LabelScore("lesion", 0.3),)


def test_a_series_of_rejected_images_only_has_a_result_without_key_images(tmp_path: Path) -> None:
    with _line(tmp_path) as line:
        line.store("1.1", CorruptDicom("Cut short."))
        line.store("1.2", CorruptDicom("Cut short."))
        _complete(line.assembler())
        result = line.live()
        assert (result.images_scored, result.images_rejected, result.key_images) == (0, 2, ())
        assert result.decision is not Decision.POSITIVE and result.findings == ()


def test_a_series_without_a_scored_image_is_not_called_negative(tmp_path: Path) -> None:
    """Nothing was looked at, so nothing can be said to be absent."""
    with _line(tmp_path) as line:
        line.store("1.1", CorruptDicom("Cut short."))
        line.store("1.2", CorruptDicom("Cut short."))
        _complete(line.assembler())
        live = line.live()
        assert live.decision is Decision.INDETERMINATE and live.findings == ()
        assert (live.images_scored, live.images_rejected, live.key_images, live.key_label) == (0, 2, (), "")


# --- late images --------------------------------------------------------------------------------------------


def test_a_late_image_reopens_the_series_and_its_revision_supersedes_the_first(tmp_path: Path) -> None:
    with _line(tmp_path) as line:
        line.store("1.1", 0.2)
        line.store("1.2", 0.3)
        # The first result as the assembler stores it where its SR goes to the PACS: named by its SR's UID.
        state = line.journal.series_state(line.series_id())
        assert state is not None
        first = replace(combine(state, line.scorer, time.time_ns() // 1_000_000), report_uid="2.25.100")
        assert first.revision == 1 and first.revises_sequence == 0 and first.revises_report_uid == ""
        first_seq = line.journal.complete_series(state, payload.encode_series(first))
        assert first_seq == 3 and line.journal.open_series() == 0
        (late,) = line.store("1.3", 0.9)  # a slice that came after the series was complete
        assert late.sequence == 4 and line.journal.open_series() == 1
        assert line.live().sequence == first_seq  # the first stands until its revision is made
        assembler = line.assembler()
        _complete(assembler)
        revised = line.live()
        assert revised.sequence == 5 and revised.revision == 2
        assert (revised.revises_sequence, revised.revises_report_uid) == (first_seq, "2.25.100")
        assert (revised.decision, revised.images_scored) == (Decision.POSITIVE, 3)
        assert revised.key_images[0] == KeyImage("1.3", 0, 0.9, 4)
        assert revised.first_image_unix_ms == first.first_image_unix_ms
        assert revised.last_image_unix_ms >= first.last_image_unix_ms
        # Both on the stream, in order; one live.
        assert [(r.sequence, r.revision) for r in line.series_results()] == [(3, 1), (5, 2)]
        assert assembler.complete_due() == 0 and line.journal.open_series() == 0


def test_every_late_image_revises_the_last_result(tmp_path: Path) -> None:
    with _line(tmp_path) as line:
        assembler = line.assembler()
        line.store("1.0", 0.1)
        _complete(assembler)
        for n in range(1, 4):
            line.store(f"1.{n}", 0.1 * n)
            _complete(assembler)
        chain = line.series_results()
        assert [r.revision for r in chain] == [1, 2, 3, 4]
        assert [r.revises_sequence for r in chain] == [0] + [r.sequence for r in chain[:-1]]
        assert line.live() == chain[-1]


# --- the assembler's thread, a restart ----------------------------------------------------------------------


def test_the_assembler_completes_a_series_due_at_once_while_running(tmp_path: Path) -> None:
    with _line(tmp_path, LONG_S) as line:
        assembler = line.assembler()
        assembler.start()
        try:
            line.store("1.1", 0.7, 0.2)  # a multi-frame instance: due the moment it is stored
            stored = eventually(lambda: line.journal.series_result(SERIES), "the series result", wait=_waiter(line))
            assert stored is not None and stored.series().completion is Completion.HEADER
        finally:
            assembler.stop()
        assert not assembler.alive()


def test_a_restart_neither_loses_nor_doubles_a_series_result(tmp_path: Path) -> None:
    with _line(tmp_path, LONG_S) as line:
        line.store("1.1", 0.9, 0.1)  # due at once, for its header; the daemon stops before its result is made
        line.store("2.1", 0.4, series=SERIES + ".2")  # waiting out its quiet period
        before = line.journal.series_state(line.series_id(SERIES + ".2"))
        assert before is not None
    with _line(tmp_path, LONG_S) as line:
        started_ms = time.time_ns() // 1_000_000
        first = line.assembler()
        first.start()
        try:
            eventually(lambda: line.journal.series_result(SERIES), "the header's series result", wait=_waiter(line))
        finally:
            first.stop()
        waiting = line.journal.series_state(line.series_id(SERIES + ".2"))
        assert waiting is not None and waiting.state == "open"
        assert waiting.due_ms >= max(before.due_ms, started_ms + round(LONG_S * 1000))  # a whole quiet period again
    with _line(tmp_path, LONG_S) as line:
        again = line.assembler()
        again.start()
        try:
            assert again.complete_due() == 0
        finally:
            again.stop()
        assert [(r.series_instance_uid, r.revision) for r in line.series_results()] == [(SERIES, 1)]
        assert line.journal.open_series() == 1


def test_a_series_whose_result_cannot_be_stored_stays_open_and_is_tried_again_later(tmp_path: Path) -> None:
    """The reserve outside the journal cannot be raised (a full disk): the series result is not stored above it, and
    the series waits RETRY_S before the next try."""

    class FullDisk:
        def ceiling(self) -> int:
            return 0

        def reserve(self, top: int, committed: int) -> None:
            raise OSError(28, "No space left on device")

        def closed(self, committed: int) -> None:
            pass

    with _line(tmp_path, LONG_S) as line:
        line.store("1.1", 0.9, 0.1)
        line.journal.set_reserve(FullDisk())
        before_ms = time.time_ns() // 1_000_000
        assert line.assembler().complete_due() == 0
        assert line.series_results() == [] and line.journal.open_series() == 1
        due = line.journal.next_series_due_ms()
        assert due is not None and due >= before_ms + round(RETRY_S * 1000)


def test_a_series_that_cannot_be_read_waits_and_the_others_due_complete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged row (one of its images' results unreadable) fails its series only, once per RETRY_S, not the round
    nor the assembler in a loop."""
    with _line(tmp_path, LONG_S) as line:
        line.store("1.1", 0.9, 0.1)  # two frames: all in, due at once
        line.store("2.1", 0.3, 0.2, series=SERIES + ".2")
        damaged = line.series_id()
        with sqlite3.connect(line.journal.path) as db:
            db.execute("UPDATE results SET payload = x'00ff' WHERE series_id = ?", (damaged,))
        before_ms = time.time_ns() // 1_000_000
        with caplog.at_level(logging.ERROR, logger="appliance.scoring.series"):
            assert line.assembler().complete_due() == 1
        assert [r.series_instance_uid for r in line.series_results()] == [SERIES + ".2"]
        assert [r.getMessage() for r in caplog.records] == [
            f"series {damaged}: its result could not be made; tried again in {RETRY_S:.0f} s: JSONDecodeError"
        ]
        due = line.journal.next_series_due_ms()
        assert line.journal.open_series() == 1 and due is not None and due >= before_ms + round(RETRY_S * 1000)


def _waiter(line: Line) -> Callable[[], None]:
    """Waits for the journal's next commit (or a little while), instead of a fixed sleep between probes."""

    def wait() -> None:
        with line.journal.changed:
            line.journal.changed.wait(0.1)

    return wait


# --- numbering --------------------------------------------------------------------------------------------


def test_series_results_take_their_place_in_the_one_numbering(tmp_path: Path) -> None:
    with _line(tmp_path) as line:
        assembler = line.assembler()
        line.store("1.1", 0.6)
        line.store("", 0.4, source_format="png")
        line.store("1.2", 0.2)
        _complete(assembler)
        line.store("2.1", 0.1, series=SERIES + ".2")
        stored = line.journal.results_after(0)
        kinds = ["image", "image", "image", "series", "image"]
        assert [(s.seq, s.kind) for s in stored] == list(zip(range(1, 6), kinds, strict=True))
        series = stored[3].series()
        assert series.sequence == 4 and [k.sequence for k in series.key_images] == [1, 3]
        assert [s.result().sequence for s in stored if s.kind == "image"] == [1, 2, 3, 5]
