"""A completed series' objects for the PACS: real DICOM slices scored by models/pipeline-test through the daemon's
own preparer, backend and result builder, kept as the finisher keeps key candidates (Reports.key_material), made
into the series' Enhanced SR, Key Object Selection and key images' heatmaps, read back with pydicom and checked
by dciodvfy."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    EnhancedSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from appliance.config import InferenceConfig, PacsConfig
from appliance.delivery import overlay, sr
from appliance.delivery.reports import Reports
from appliance.delivery.series_report import decode_display, decode_header, encode_header, series_report_uid
from appliance.domain.result import Result
from appliance.domain.series import (
    Completion,
    ImageScores,
    SeriesResult,
    key_images,
    key_label,
    per_label,
)
from appliance.inference.backend import Backend
from appliance.inference.loader import open_backend
from appliance.inference.postprocess import decide
from appliance.journal.journal import KeyCandidate, NewDelivery
from tests.delivery.test_overlay import LOADED, MANIFEST, Scored, assert_valid, read, sample, score
from tests.delivery.test_sr import (
    DEVICE,
    FINDING,
    MEASUREMENT_GROUP,
    PRESENT,
    SCORE,
    SOURCE_OF_MEASUREMENT,
    TRACKING_IDENTIFIER,
    _numbers,
    concept,
    items,
)

SERIES = PacsConfig(enabled=True, series_number=9001)  # report_per = "series": the default
PER_IMAGE = PacsConfig(enabled=True, series_number=9001, report_per="image")
PATIENT = ("Doe^Jane", "PID-4711")  # what must never reach the log
# Per slice, the bright disc pipeline-test finds (0: none): the key images are slices 5, 4, 2, best first.
AMPLITUDES = (0, 0, 650, 0, 800, 1000, 0)
KEYS = [5, 4, 2]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The FP32 pipeline-test model with its heatmap, as the daemon loads it."""
    with open_backend(LOADED, InferenceConfig(threads=1), tmp_path_factory.mktemp("engines")) as b:
        yield b


def ct_slice(folder: Path, study: str, series: str, index: int, amplitude: float) -> Path:
    """One slice of a CT series (CT_small's header, 256 x 256 pixels) with a bright blurred disc of
    ``amplitude`` (0: none), and a patient whose name and ID the log must never show."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    yy, xx = np.mgrid[0:256, 0:256]
    pixels = 100 + amplitude * np.exp(-(((yy - 90 - 5 * index) ** 2 + (xx - 150) ** 2) / (2 * 20.0**2)))
    pixels += np.random.default_rng(index).normal(0, 20, pixels.shape)
    ds.Rows = ds.Columns = 256
    ds.PixelData = np.clip(pixels, -1000, 3000).astype(np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 500, 1000
    ds.PatientName, ds.PatientID = PATIENT
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = index + 1
    ds.add_new(0x00291010, "OB", b"\x01" * 4000)  # a private blob a kept header leaves out
    ds.add_new(0x00291000, "LO", "ACME")  # its creator
    path = folder / f"slice{index}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass(frozen=True)
class Series:
    scored: list[Scored]  # per file
    results: list[Result]  # every frame's, numbered as the journal numbers them
    candidates: list[KeyCandidate]  # what the finisher kept of each


def scored_series(backend: Backend, paths: Sequence[Path], pacs: PacsConfig = SERIES, first_seq: int = 1) -> Series:
    """Each file scored as the daemon scores it, its results numbered, and each frame kept as a key candidate."""
    reports = Reports(pacs, DEVICE)
    scored, results, candidates = [], [], []
    seq = first_seq
    for input_id, path in enumerate(paths, 1):
        s = score(backend, path)
        scored.append(s)
        for r in s.results:
            r = replace(r, sequence=seq)
            seq += 1
            results.append(r)
            material = reports.key_material(input_id, path, r, s.prepared.display[r.frame_index])
            assert material is not None
            candidates.append(KeyCandidate(r, *material))
    return Series(scored, results, candidates)


def series_result(results: Sequence[Result], revision: int = 1, revises_report_uid: str = "") -> SeriesResult:
    """The series result of ``results`` by the manifest's [series] (max, 3 key images), as the assembler makes it."""
    rule, labels = MANIFEST.series, MANIFEST.output.labels
    images = [
        ImageScores(r.sequence, r.ids.sop_instance_uid, r.frame_index, {s.label: s.score for s in r.scores})
        for r in results
    ]
    scores = per_label(images, labels, rule.combine, rule.k)
    decided = decide(np.array([s.score for s in scores]), MANIFEST)
    label = key_label(scores, decided.findings, MANIFEST.decision.negative_labels)
    first = results[0]
    return SeriesResult(
        study_instance_uid=first.ids.study_instance_uid,
        series_instance_uid=first.ids.series_instance_uid,
        accession_number=first.ids.accession_number,
        images_scored=len(results),
        images_rejected=0,
        scores=scores,
        decision=decided.decision,
        findings=decided.findings,
        threshold=decided.threshold,
        key_label=label,
        key_images=key_images(images, label, rule.key_images),
        scored_by=first.scored_by,
        combine=rule.describe(),
        completion=Completion.STABLE,
        revision=revision,
        created_unix_ms=first.created_unix_ms + 30_000,
        first_image_unix_ms=first.created_unix_ms,
        last_image_unix_ms=first.created_unix_ms,
        revises_report_uid=revises_report_uid,
    )


@pytest.fixture(scope="module")
def ct(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Series:
    folder = tmp_path_factory.mktemp("ct")
    study, series = generate_uid(), generate_uid()
    return scored_series(backend, [ct_slice(folder, study, series, i, a) for i, a in enumerate(AMPLITUDES)])


def classes(made: Sequence[NewDelivery]) -> list[str]:
    return [d.sop_class_uid for d in made]


def measurement_groups(report: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [
        group
        for container in items(report)
        for group in items(container)
        if group.ValueType == "CONTAINER" and concept(group) == MEASUREMENT_GROUP
    ]


@dataclass(frozen=True)
class Group:
    tracking: str
    finding: tuple[str, str]
    value: tuple[str, str]
    score: float
    image: tuple[str, str, list[int]] | None  # (SOP class, SOP instance, frames) where the group names one


def group_facts(group: pydicom.Dataset) -> Group:
    finding = next(i.ConceptCodeSequence[0] for i in items(group) if concept(i) == FINDING)
    code = (finding.CodeValue, finding.CodingSchemeDesignator)
    value = next(i for i in items(group) if i.ValueType == "CODE" and concept(i) == code).ConceptCodeSequence[0]
    measured = next(i for i in items(group) if i.ValueType == "NUM" and concept(i) == SCORE).MeasuredValueSequence[0]
    sources = [i.ReferencedSOPSequence[0] for i in items(group) if concept(i) == SOURCE_OF_MEASUREMENT]
    image = None
    if sources:
        (ref,) = sources
        image = (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID, _numbers(ref.get("ReferencedFrameNumber")))
    return Group(
        tracking=next(i.TextValue for i in items(group) if concept(i) == TRACKING_IDENTIFIER),
        finding=code,
        value=(value.CodeValue, value.CodingSchemeDesignator),
        score=float(measured.NumericValue),
        image=image,
    )


def kos_references(kos: pydicom.Dataset) -> list[tuple[str, str, list[int]]]:
    out = []
    for item in items(kos):
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            out.append(
                (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID, _numbers(ref.get("ReferencedFrameNumber")))
            )
        assert item.ValueType != "COMPOSITE"  # images, which viewers flag
    return out


def evidence_uids(document: pydicom.Dataset) -> list[str]:
    return [
        ref.ReferencedSOPInstanceUID
        for study in document.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]


# --- the series' three kinds of objects ------------------------------------------------------------------------


def test_a_series_gives_its_sr_then_its_kos_then_a_heatmap_per_key_image(ct: Series, tmp_path: Path) -> None:
    result = series_result(ct.results)
    assert [k.sequence for k in result.key_images] == [ct.results[i].sequence for i in KEYS]
    key_results = [ct.results[i] for i in KEYS]
    # The assembler passes every kept candidate, in the journal's order: the key images are picked from them.
    made = Reports(SERIES, DEVICE).for_series(result, list(reversed(ct.candidates)), MANIFEST)
    assert classes(made) == [EnhancedSRStorage, KeyObjectSelectionDocumentStorage] + [SecondaryCaptureImageStorage] * 3
    for delivery in made:
        assert_valid(tmp_path, delivery)
    report, kos, *overlays = (read(d) for d in made)
    source = decode_header(ct.candidates[0].header or b"")

    # The SR: the series' result in the appliance's report series, numbered by its revision.
    assert report.SOPInstanceUID == made[0].sop_instance_uid == series_report_uid(result, DEVICE.uid)
    assert report.StudyInstanceUID == result.study_instance_uid and report.SeriesNumber == 9001
    assert report.SeriesInstanceUID == sr.series_uid(result.study_instance_uid, "pipeline-test", DEVICE.uid)
    assert report.SeriesDescription == "AI series result: pipeline-test" and report.InstanceNumber == 1
    assert (report.PatientName, report.PatientID) == PATIENT
    assert "PredecessorDocumentsSequence" not in report
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = [group_facts(g) for g in measurement_groups(report)]
    (series_level,) = [g for g in groups if g.image is None]
    (lesion,) = result.scores
    assert series_level.tracking == "lesion" and series_level.finding == ("52988006", "SCT")
    assert series_level.value == PRESENT and series_level.score == pytest.approx(lesion.score)
    image_level = [g for g in groups if g.image is not None]
    assert [g.image for g in image_level] == [
        (str(source.SOPClassUID), r.ids.sop_instance_uid, []) for r in key_results
    ]
    assert [g.score for g in image_level] == pytest.approx([k.score for k in result.key_images])
    assert [g.tracking for g in image_level] == [f"lesion: key image {n}" for n in (1, 2, 3)]
    assert [g.value for g in image_level] == [PRESENT] * 3
    assert sorted(evidence_uids(report)) == sorted(r.ids.sop_instance_uid for r in key_results)

    # The KOS: "Of Interest", exactly the key images, in a series of its own.
    assert kos.Modality == "KO" and kos.SeriesNumber == 9003 and kos.InstanceNumber == 1
    assert (kos.ConceptNameCodeSequence[0].CodeValue, kos.ConceptNameCodeSequence[0].CodingSchemeDesignator) == (
        "113000",
        "DCM",
    )
    assert kos.SeriesInstanceUID not in (report.SeriesInstanceUID, overlays[0].SeriesInstanceUID)
    assert kos.StudyInstanceUID == result.study_instance_uid and (kos.PatientName, kos.PatientID) == PATIENT
    assert kos_references(kos) == [(str(source.SOPClassUID), r.ids.sop_instance_uid, []) for r in key_results]
    (text,) = [i.TextValue for i in items(kos) if concept(i) == ("113012", "DCM")]  # Key Object Description
    assert text == "Key images of pipeline-test 1.0.0: positive for lesion"

    # The heatmaps: one per key image, best first, each referencing its image and the series' SR.
    for sc, image in zip(overlays, key_results, strict=True):
        assert sc.SOPInstanceUID == overlay.instance_uid(image, DEVICE.uid) and sc.SeriesNumber == 9002
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == image.ids.sop_instance_uid
        assert sc.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == report.SOPInstanceUID
        assert (sc.Rows, sc.Columns) == (256, 256) and (sc.PatientName, sc.PatientID) == PATIENT


def test_rebuilt_the_objects_are_the_same_and_a_revision_supersedes_the_first_sr(
    backend: Backend, ct: Series, tmp_path: Path
) -> None:
    reports = Reports(SERIES, DEVICE)
    first = series_result(ct.results)
    made = reports.for_series(first, ct.candidates, MANIFEST)
    # Rebuilt after a crash (a new result object): the same instances, byte for byte.
    assert reports.for_series(replace(first), ct.candidates, MANIFEST) == made

    # A late slice, the best of all: revision 2. The journal dropped the first key images' frames once their
    # heatmaps were queued; the late one has its own.
    folder = tmp_path / "late"
    folder.mkdir()
    late_path = ct_slice(folder, first.study_instance_uid, first.series_instance_uid, 7, 1200)
    sent = [replace(c, display=None) for c in ct.candidates]
    revised_inputs = scored_series(backend, [late_path], first_seq=len(ct.results) + 1)
    revision = series_result(
        [*ct.results, *revised_inputs.results], revision=2, revises_report_uid=made[0].sop_instance_uid
    )
    newest = revised_inputs.results[0]
    assert revision.key_images[0].sequence == newest.sequence
    again = reports.for_series(revision, [*sent, *revised_inputs.candidates], MANIFEST)
    assert classes(again) == [EnhancedSRStorage, KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage]
    for delivery in again:
        assert_valid(tmp_path, delivery)
    report, kos, sc = (read(d) for d in again)
    assert report.SOPInstanceUID not in (made[0].sop_instance_uid, series_report_uid(first, DEVICE.uid))
    assert report.SeriesInstanceUID == read(made[0]).SeriesInstanceUID and report.InstanceNumber == 2
    (study,) = report.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.study_instance_uid
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == report.SeriesInstanceUID
    (earlier,) = series.ReferencedSOPSequence
    assert (earlier.ReferencedSOPClassUID, earlier.ReferencedSOPInstanceUID) == (
        EnhancedSRStorage,
        made[0].sop_instance_uid,
    )
    assert kos.SOPInstanceUID != made[1].sop_instance_uid and kos.InstanceNumber == 2
    assert [uid for _, uid, _ in kos_references(kos)] == [
        newest.ids.sop_instance_uid,
        *(ct.results[i].ids.sop_instance_uid for i in KEYS[:2]),
    ]
    # Only the new key image's heatmap: the others are in the outbox already (the same instances).
    assert sc.SOPInstanceUID == overlay.instance_uid(newest, DEVICE.uid)
    assert overlay.instance_uid(ct.results[KEYS[0]], DEVICE.uid) == made[2].sop_instance_uid


def test_a_multi_frame_instance_s_key_frames_are_referenced_by_number(backend: Backend, tmp_path: Path) -> None:
    multi = scored_series(backend, [sample("emri_small.dcm")])
    result = series_result(multi.results)
    frames = [k.frame_index + 1 for k in result.key_images]
    assert len(set(frames)) == 3
    made = Reports(SERIES, DEVICE).for_series(result, multi.candidates, MANIFEST)
    assert classes(made) == [EnhancedSRStorage, KeyObjectSelectionDocumentStorage] + [SecondaryCaptureImageStorage] * 3
    for delivery in made:
        assert_valid(tmp_path, delivery)
    report, kos, *overlays = (read(d) for d in made)
    uid = multi.results[0].ids.sop_instance_uid
    image_level = [g.image for g in map(group_facts, measurement_groups(report)) if g.image is not None]
    assert [(i, f) for _, i, f in image_level] == [(uid, [f]) for f in frames]
    assert evidence_uids(report) == [uid]  # the instance once
    ((_, referenced, numbers),) = kos_references(kos)
    assert referenced == uid and numbers == sorted(frames)
    assert [sc.SourceImageSequence[0].ReferencedFrameNumber for sc in overlays] == frames


# --- per image or per series ----------------------------------------------------------------------------------


def test_per_series_an_image_sends_nothing_and_per_image_as_before(ct: Series) -> None:
    s = ct.scored[KEYS[0]]
    per_series = Reports(SERIES, DEVICE).for_input(1, s.path, s.results, MANIFEST, s.prepared.display)
    assert per_series == [()]
    (pair,) = Reports(PER_IMAGE, DEVICE).for_input(1, s.path, s.results, MANIFEST, s.prepared.display)
    assert classes(pair) == [EnhancedSRStorage, SecondaryCaptureImageStorage]


# --- what a candidate keeps ------------------------------------------------------------------------------------


def test_key_material_round_trips_the_header_without_pixels_and_the_frame_as_shown(backend: Backend) -> None:
    reports = Reports(SERIES, DEVICE)
    for name in ("CT_small.dcm", "US1_J2KR.dcm"):
        path = sample(name)
        s = score(backend, path)
        (result,) = s.results
        (display,) = s.prepared.display
        material = reports.key_material(1, path, result, display)
        assert material is not None
        header, shown = material
        source = pydicom.dcmread(path, stop_before_pixels=True)
        kept = decode_header(header)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID", "Rows"):
            assert kept[keyword].value == source[keyword].value, keyword
        assert "PixelData" not in kept and not any(e.tag.is_private for e in kept.iterall())
        assert len(header) < 2000, len(header)
        assert shown is not None
        restored = decode_display(shown)
        assert restored.dtype == display.dtype and np.array_equal(restored, display), name
        assert len(shown) < display.nbytes  # compressed, losslessly
        # Nothing of the frame without a heatmap, or where no overlay goes.
        assert reports.key_material(1, path, replace(result, heatmap=None), display) == (header, None)
        assert reports.key_material(1, path, result, None) == (header, None)
        no_overlays = Reports(SERIES.model_copy(update={"overlays": False}), DEVICE)
        assert no_overlays.key_material(1, path, result, display) == (header, None)


def test_a_kept_header_drops_private_and_pixel_elements_and_other_frames(tmp_path: Path) -> None:
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.add_new(0x60003000, "OW", b"\0" * 512)  # an overlay plane's data
    ds.add_new(0x00291000, "LO", "ACME")
    ds.add_new(0x00291010, "OB", b"\x01" * 4000)
    frames = []
    for i in range(5):
        item = pydicom.Dataset()
        plane = pydicom.Dataset()
        plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0] if i == 3 else [0, 1, 0, 0, 0, -1]
        item.PlaneOrientationSequence = [plane]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    kept = decode_header(encode_header(ds, frame_index=3))
    assert "PixelData" not in kept and 0x60003000 not in kept and not any(e.tag.is_private for e in kept)
    per_frame = kept.PerFrameFunctionalGroupsSequence
    assert len(per_frame) == 5 and [len(item) for item in per_frame] == [0, 0, 0, 1, 0]  # frames keep their numbers
    assert list(per_frame[3].PlaneOrientationSequence[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert kept.PatientName == ds.PatientName and kept.SpecificCharacterSet == ds.SpecificCharacterSet


def test_an_unreadable_source_keeps_nothing_and_says_why_without_its_path(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = score(backend, sample("CT_small.dcm"))
    (result,) = s.results
    gone = tmp_path / "Doe_Jane.dcm"  # a name can be patient data too
    caplog.set_level(logging.WARNING)
    assert Reports(SERIES, DEVICE).key_material(42, gone, result, s.prepared.display[0]) is None
    (record,) = [r for r in caplog.records if "input 42" in r.getMessage()]
    assert "FileNotFoundError" in record.getMessage() and "Doe" not in record.getMessage()


# --- what cannot be made --------------------------------------------------------------------------------------


def test_a_key_image_without_material_is_left_out_and_the_rest_goes(ct: Series, tmp_path: Path) -> None:
    result = series_result(ct.results)
    second = ct.results[KEYS[1]].sequence
    lacking = [replace(c, header=None, display=None) if c.image.sequence == second else c for c in ct.candidates]
    made = Reports(SERIES, DEVICE).for_series(result, lacking, MANIFEST)
    assert classes(made) == [EnhancedSRStorage, KeyObjectSelectionDocumentStorage] + [SecondaryCaptureImageStorage] * 2
    report, kos = read(made[0]), read(made[1])
    wanted = [ct.results[KEYS[0]].ids.sop_instance_uid, ct.results[KEYS[2]].ids.sop_instance_uid]
    assert [uid for _, uid, _ in kos_references(kos)] == wanted
    image_level = [g for g in map(group_facts, measurement_groups(report)) if g.image is not None]
    assert [g.image[1] for g in image_level if g.image] == wanted
    assert [g.tracking for g in image_level] == ["lesion: key image 1", "lesion: key image 3"]  # ranks kept
    for delivery in made:
        assert_valid(tmp_path, delivery)


def test_headers_lacking_their_uids_give_no_objects_and_a_warning_without_patient_data(
    ct: Series, caplog: pytest.LogCaptureFixture
) -> None:
    result = series_result(ct.results)

    def stripped(candidate: KeyCandidate) -> KeyCandidate:
        header = decode_header(candidate.header or b"")
        del header.SOPInstanceUID, header.StudyInstanceUID
        return replace(candidate, header=encode_header(header))

    caplog.set_level(logging.WARNING)
    assert Reports(SERIES, DEVICE).for_series(result, [stripped(c) for c in ct.candidates], MANIFEST) == ()
    said = [r.getMessage() for r in caplog.records]
    assert any("no objects for the PACS" in line for line in said), said
    assert any("lacks StudyInstanceUID, SOPInstanceUID" in line for line in said), said
    secrets = [*PATIENT, "Doe", result.study_instance_uid, result.series_instance_uid]
    secrets += [r.ids.sop_instance_uid for r in ct.results]
    assert not [line for line in said if any(s in line for s in secrets)], said

    caplog.clear()
    nothing = [replace(c, header=None) for c in ct.candidates]
    assert Reports(SERIES, DEVICE).for_series(result, nothing, MANIFEST) == ()
    assert any("no objects for the PACS" in r.getMessage() for r in caplog.records)
    other_model = replace(result, scored_by=replace(result.scored_by, model_version="9"))
    assert Reports(SERIES, DEVICE).for_series(other_model, ct.candidates, MANIFEST) == ()


def test_a_bad_display_frame_leaves_out_its_heatmap_only(ct: Series) -> None:
    result = series_result(ct.results)
    first = ct.results[KEYS[0]].sequence
    broken = [replace(c, display=b"not a png") if c.image.sequence == first else c for c in ct.candidates]
    made = Reports(SERIES, DEVICE).for_series(result, broken, MANIFEST)
    assert classes(made) == [EnhancedSRStorage, KeyObjectSelectionDocumentStorage] + [SecondaryCaptureImageStorage] * 2
    assert [d.sop_instance_uid for d in made[2:]] == [overlay.instance_uid(ct.results[i], DEVICE.uid) for i in KEYS[1:]]
