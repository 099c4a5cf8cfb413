"""Heatmap overlays for the PACS: real DICOM images scored by models/pipeline-test through the daemon's own
preparer, backend and result builder, made into RGB Secondary Captures by the daemon's Reports beside their SR,
checked with pydicom and dciodvfy, and sent through the real journal and outbox to a real Storage SCP."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import EnhancedSRStorage, SecondaryCaptureImageStorage, generate_uid

import appliance.prepare.preparer as preparer_module
from appliance.config import InferenceConfig, LimitsConfig, PacsConfig
from appliance.delivery.outbox import Outbox
from appliance.delivery.overlay import DISPLAY_SIDE, instance_uid, overlay_pixels
from appliance.delivery.patient import METHOD_NOT_STATED, PATIENT_MODULE
from appliance.delivery.reports import Reports
from appliance.domain.delivery import DeliveryState
from appliance.domain.manifest import load_manifest
from appliance.domain.result import Heatmap, InputFacts, Result
from appliance.files.content_hash import digest_bytes
from appliance.imaging.overlay import render, to_gray8
from appliance.imaging.reader import decode
from appliance.inference.backend import Backend
from appliance.inference.batcher import BatchTiming
from appliance.inference.loader import open_backend
from appliance.inference.runs import rows_in_batches
from appliance.journal.integrity import open_journal, recover
from appliance.journal.journal import NewDelivery
from appliance.prepare.preparer import Prepared, Preparer
from appliance.scoring.job import Scorer
from appliance.scoring.results import build_results, journal_row
from tests.delivery.test_outbox import Pacs, Recorder, _config, _running
from tests.delivery.test_sr import DEVICE
from tests.peers import require
from tests.peers.dcmtk import dciodvfy

REPO = Path(__file__).resolve().parents[2]
LOADED = load_manifest(REPO / "models" / "pipeline-test")
MANIFEST = LOADED.manifest
PACS = PacsConfig(enabled=True, series_number=9001, report_per="image")


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    """A Storage SCP on a free port (tests/delivery/test_outbox.py's), taking SRs and Secondary Captures."""
    peer = Pacs()
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The FP32 pipeline-test model with its heatmap, as the daemon loads it (no artifacts: the reference)."""
    with open_backend(LOADED, InferenceConfig(threads=1), tmp_path_factory.mktemp("engines")) as b:
        assert b.has_heatmap
        yield b


@dataclass(frozen=True)
class Scored:
    path: Path
    prepared: Prepared
    results: list[Result]


def score(backend: Backend, path: Path, *, display_side: int = DISPLAY_SIDE) -> Scored:
    """The daemon's scoring of one file, less the journal: prepare (keeping display frames), infer, build results."""
    data = path.read_bytes()
    prepared = Preparer(MANIFEST, LimitsConfig(), display_side=display_side).prepare(data, path.name)
    rows = rows_in_batches(backend, prepared.tensors, MANIFEST.output.activation)
    timing = BatchTiming(queue_ms=0.0, infer_ms=0.0, batch_size=len(rows))
    facts = InputFacts(1, "dicom", path.name, digest_bytes(data))
    results = build_results(facts, prepared, [(row, None, timing) for row in rows], time.perf_counter(),
                            Scorer(MANIFEST, backend.name))  # fmt: skip
    assert all(r.heatmap is not None for r in results)
    return Scored(path, prepared, results)


def deliveries(scored: Scored) -> list[tuple[NewDelivery, ...]]:
    return Reports(PACS, DEVICE).for_input(1, scored.path, scored.results, MANIFEST, scored.prepared.display)


def read(delivery: NewDelivery) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(delivery.payload))


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path)


def assert_valid(tmp_path: Path, delivery: NewDelivery) -> None:
    require("dciodvfy")
    path = tmp_path / f"{delivery.sop_instance_uid}.dcm"
    path.write_bytes(delivery.payload)
    rc, errors = dciodvfy(path)
    assert rc == 0 and errors == [], errors


def big_ct(path: Path, rows: int = 1800, cols: int = 2400, disc: tuple[int, int, int] = (500, 1700, 160)) -> Path:
    """A CT-like 16-bit image far larger than the model's input, with a window (so it is shrunk first) and one
    bright blurred disc at (row, column, radius): what pipeline-test finds."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx, r = disc
    pixels = 100 + 900 * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (r / 1.5) ** 2)))
    pixels += np.random.default_rng(3).normal(0, 20, pixels.shape)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.clip(pixels, -1000, 3000).astype(np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 500, 1000
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


# --- what the preparer keeps -----------------------------------------------------------------------------


def test_display_frames_only_when_asked_and_only_for_dicom(backend: Backend, tmp_path: Path) -> None:
    ct = sample("CT_small.dcm").read_bytes()
    manifest = MANIFEST
    assert Preparer(manifest, LimitsConfig()).prepare(ct).display == ()  # not asked: nothing kept
    asked = Preparer(manifest, LimitsConfig(), display_side=DISPLAY_SIDE)
    (frame,) = asked.prepare(ct).display
    assert frame.dtype == np.uint8 and frame.shape == (128, 128)  # gray: one channel; smaller than the cap: as is
    full = decode(ct, limits=asked.limits, preprocess=manifest.preprocess).frames[0]
    assert np.array_equal(frame, to_gray8(full)[:, :, 0])
    png = cv2.imencode(".png", frame)[1].tobytes()
    assert asked.prepare(png).display == ()  # an overlay goes into a scanned study: DICOM only
    (colour,) = asked.prepare(sample("US1_J2KR.dcm").read_bytes()).display
    assert colour.shape == (480, 640, 3) and colour.dtype == np.uint8


def test_shrunk_first_frames_are_shrunk_to_the_display_size_in_the_same_decode_the_tensors_unchanged(
    tmp_path: Path,
) -> None:
    data = big_ct(tmp_path / "big.dcm").read_bytes()
    plain = Preparer(MANIFEST, LimitsConfig()).prepare(data)
    asked = Preparer(MANIFEST, LimitsConfig(), display_side=DISPLAY_SIDE).prepare(data)
    (frame,) = asked.display
    # The stored 1800 x 2400 over the least whole factor that brings it under the cap (3): not the model's 64 px.
    assert frame.shape == (600, 800)
    assert all(np.array_equal(a, b) for a, b in zip(plain.tensors, asked.tensors, strict=True))
    assert asked.meta.rows == 1800 and asked.meta.columns == 2400  # the source's size, which the extent is in


def test_a_long_series_keeps_its_display_frames_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preparer_module, "DISPLAY_BUDGET_PIXELS", 10 * 32 * 32)
    frames = (
        Preparer(MANIFEST, LimitsConfig(), display_side=DISPLAY_SIDE)
        .prepare(sample("emri_small.dcm").read_bytes())
        .display
    )
    assert len(frames) == 10 and {f.shape for f in frames} == {(32, 32)}  # 10 frames of 64 x 64, halved


# --- the Secondary Capture --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm"])
def test_an_overlay_is_rgb_in_the_study_and_references_its_image_and_its_report(
    backend: Backend, tmp_path: Path, name: str
) -> None:
    scored = score(backend, sample(name))
    (result,) = scored.results
    ((report, overlay),) = deliveries(scored)  # the report first: GetResult's delivery is the report's
    source, sr, sc = pydicom.dcmread(scored.path, stop_before_pixels=True), read(report), read(overlay)

    assert (report.sop_class_uid, overlay.sop_class_uid) == (EnhancedSRStorage, SecondaryCaptureImageStorage)
    assert overlay.sop_instance_uid == sc.SOPInstanceUID == sc.file_meta.MediaStorageSOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)  # smaller than the cap: the source's size
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, sr.SeriesInstanceUID) and sc.SeriesNumber == 9002
    assert sc.SeriesDescription == "AI heatmap: pipeline-test" and sc.Modality == "OT"
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert sc.InstanceNumber == sr.InstanceNumber
    (image,) = sc.SourceImageSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    assert "ReferencedFrameNumber" not in image
    assert image.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"  # source image for image processing
    (document,) = sc.ReferencedInstanceSequence
    assert (document.ReferencedSOPClassUID, document.ReferencedSOPInstanceUID) == (sr.SOPClassUID, sr.SOPInstanceUID)
    assert result.heatmap is not None
    for text in (sc.ImageComments, sc.DerivationDescription):
        assert "pipeline-test 1.0.0" in text and result.heatmap.label in text and "Not for diagnosis" in text
    # The pixels are the colour map over the frame as shown, drawn by imaging/overlay.py.
    (display,) = scored.prepared.display
    expected = overlay_pixels(display, result.heatmap, int(source.Rows), int(source.Columns))
    assert np.array_equal(sc.pixel_array, expected)
    assert np.any(sc.pixel_array.max(axis=2) - sc.pixel_array.min(axis=2) > 40)  # colour where the model looked
    assert_valid(tmp_path, overlay)


def anonymised_ct(path: Path) -> Path:
    """A CT as an anonymiser leaves it (CQ500's, say): a single-component name with digits for the patient's name
    and ID, Patient Identity Removed YES and no de-identification method."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.PatientName = ds.PatientID = "CQ500-CT-310"
    ds.PatientIdentityRemoved = "YES"
    for keyword in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        assert keyword not in ds
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_report_and_overlay_of_an_anonymised_image_are_valid_and_say_the_same_of_its_patient(
    backend: Backend, tmp_path: Path
) -> None:
    scored = score(backend, anonymised_ct(tmp_path / "cq500.dcm"))
    ((report, overlay),) = deliveries(scored)
    sr, sc = read(report), read(overlay)
    for made in (sr, sc):
        assert made.PatientName == made.PatientID == "CQ500-CT-310" and made.PatientIdentityRemoved == "YES"
        assert made.DeidentificationMethod == METHOD_NOT_STATED  # the Type 1C pair, filled in
    module = [k for k in PATIENT_MODULE if k in sr]
    assert module == [k for k in PATIENT_MODULE if k in sc]
    assert all(sr[k].value == sc[k].value for k in module), module
    assert_valid(tmp_path, report)
    assert_valid(tmp_path, overlay)


def test_each_frame_of_a_multi_frame_image_gets_its_overlay_referencing_that_frame(
    backend: Backend, tmp_path: Path
) -> None:
    scored = score(backend, sample("emri_small.dcm"))
    made = deliveries(scored)
    assert len(made) == 10 and all(len(pair) == 2 for pair in made)
    report, overlay = made[2]
    sc, sr = read(overlay), read(report)
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 3 and sc.InstanceNumber == 3
    assert sc.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
    assert len({pair[1].sop_instance_uid for pair in made}) == 10
    assert_valid(tmp_path, overlay)


def test_an_overlay_rebuilt_is_the_same_object_and_a_new_model_version_makes_another(backend: Backend) -> None:
    scored = score(backend, sample("CT_small.dcm"))
    assert deliveries(scored) == deliveries(scored)  # the same result, the same bytes
    # Scored again (a crash before the result was stored): the same instances, which a PACS keeps once.
    rescored = score(backend, sample("CT_small.dcm"))
    uids = [[d.sop_instance_uid for d in pair] for pair in deliveries(scored)]
    assert uids == [[d.sop_instance_uid for d in pair] for pair in deliveries(rescored)]
    (result,) = scored.results
    newer = replace(result, scored_by=replace(result.scored_by, model_version="1.0.1"))
    assert instance_uid(newer, DEVICE.uid) != instance_uid(result, DEVICE.uid)
    other = replace(result, input=replace(result.input, content_hash="cd" * 32))
    assert instance_uid(other, DEVICE.uid) != instance_uid(result, DEVICE.uid)


def test_a_shrunk_first_image_s_overlay_lies_where_the_full_size_one_does(backend: Backend, tmp_path: Path) -> None:
    """The heatmap's extent is in the source's pixels; the display frame is 800 x 600 of a 2400 x 1800 source.
    The SC must be the full-resolution overlay (the source's frame as shown, the map in its own pixels), shrunk."""
    scored = score(backend, big_ct(tmp_path / "big.dcm"))
    (result,) = scored.results
    ((_, overlay),) = deliveries(scored)
    sc = read(overlay).pixel_array
    assert sc.shape == (600, 800, 3)
    assert result.heatmap is not None
    frame = decode(scored.path.read_bytes(), limits=Preparer(MANIFEST, LimitsConfig()).limits,
                   preprocess=MANIFEST.preprocess).frames[0]  # fmt: skip
    reference = cv2.resize(render(frame, result.heatmap), (800, 600), interpolation=cv2.INTER_AREA)
    diff = np.abs(sc.astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 8, (diff.mean(), np.percentile(diff, 99))
    # Drawn with the extent left in source pixels, the map would sit 3 times too far right and down.
    (display,) = scored.prepared.display
    wrong = np.abs(render(display, result.heatmap).astype(np.int16) - reference.astype(np.int16))
    assert wrong.mean() > 3 * diff.mean() + 1
    # The hottest grid cell's centre, in the overlay's pixels, is coloured at the map's peak colour.
    x, y = result.heatmap.peak
    peak = sc[int(y * 600 / 1800), int(x * 800 / 2400)].astype(int)
    assert peak[0] - peak[2] > 30  # turbo's hot end is red, the gray image shows through


# --- beside the report, through the journal and the outbox ----------------------------------------------


def test_report_and_overlay_are_stored_with_their_result_and_both_reach_the_pacs(
    backend: Backend, tmp_path: Path, pacs: Pacs
) -> None:
    """Two objects per result: stored in the result's transaction, sent by the outbox (the overlay retried alone
    when the PACS is busy for it), the result's delivery still its report's; scored again, nothing queued twice;
    `appliance journal recover` keeps both in order."""
    path = tmp_path / "data" / "journal.sqlite3"
    journal = open_journal(path)
    scored = score(backend, sample("CT_small.dcm"))
    (pair,) = deliveries(scored)
    report, overlay = pair
    reg = journal.register(source="dicom", path=None, file_name="ct.dcm", size=1, mtime_ns=1,
                           content_hash=scored.results[0].input.content_hash)  # fmt: skip
    (seq,) = journal.complete(reg.input.id, [journal_row(scored.results[0], pair)])
    assert journal.outbox_depth()[0] == 2
    delivery = journal.delivery_of(seq)
    assert delivery is not None and delivery.sop_instance_uid == report.sop_instance_uid

    pacs.answers = {overlay.sop_instance_uid: [0xA700]}  # out of resources for the overlay, once
    seen = Recorder()
    with _running(Outbox(journal, _config(pacs), seen)):
        pacs.wait(lambda: len(pacs.stored) == 2)
        seen.wait(seen.drained)
    assert pacs.stored == Counter({report.sop_instance_uid: 1, overlay.sop_instance_uid: 1})
    stored_sc = pydicom.dcmread(BytesIO(pacs.datasets[overlay.sop_instance_uid]))
    assert stored_sc.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == report.sop_instance_uid
    delivery = journal.delivery_of(seq)
    assert delivery is not None and (delivery.state, delivery.attempts) == (DeliveryState.DELIVERED, 0)

    # The same content scored again (after a recovery, say): the same two instances, not queued again.
    again = journal.register(source="dicom", path=None, file_name="ct.dcm", size=1, mtime_ns=2, content_hash="x")
    journal.complete(again.input.id, [journal_row(scored.results[0], deliveries(scored)[0])])
    assert journal.outbox_depth()[0] == 0

    # One more, left pending, then the journal is damaged and recovered: both objects kept, the report first.
    later = score(backend, sample("MR_small.dcm"))
    (pending,) = deliveries(later)
    reg = journal.register(source="dicom", path=None, file_name="mr.dcm", size=1, mtime_ns=3, content_hash="mr")
    (late_seq,) = journal.complete(reg.input.id, [journal_row(later.results[0], pending)])
    journal.close()
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)
    lines = recover(path)
    assert any(line.startswith("outbox: 4 DICOM objects for the PACS kept (2 still to send") for line in lines), lines
    journal = open_journal(path)
    assert [i.sop_instance_uid for i in journal.outbox_due(2**62, 10)] == [d.sop_instance_uid for d in pending]
    recovered = journal.delivery_of(late_seq)
    assert recovered is not None and recovered.sop_instance_uid == pending[0].sop_instance_uid
    journal.close()


def test_no_overlay_without_a_heatmap_or_a_display_frame(backend: Backend) -> None:
    scored = score(backend, sample("CT_small.dcm"))
    reports = Reports(PACS, DEVICE)
    (alone,) = reports.for_input(1, scored.path, scored.results, MANIFEST, ())
    assert [d.sop_class_uid for d in alone] == [EnhancedSRStorage]
    plain = [replace(r, heatmap=None) for r in scored.results]
    (alone,) = reports.for_input(1, scored.path, plain, MANIFEST, scored.prepared.display)
    assert [d.sop_class_uid for d in alone] == [EnhancedSRStorage]


def test_an_overlay_that_cannot_be_made_leaves_the_report_to_go_alone(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    scored = score(backend, sample("CT_small.dcm"))
    (result,) = scored.results
    assert result.heatmap is not None
    broken = [replace(result, heatmap=replace(result.heatmap, values=b"\x00"))]  # not width x height bytes
    (alone,) = Reports(PACS, DEVICE).for_input(1, scored.path, broken, MANIFEST, scored.prepared.display)
    assert [d.sop_class_uid for d in alone] == [EnhancedSRStorage]
    assert any("no overlay for the PACS: The heatmap's values" in r.getMessage() for r in caplog.records)


def test_the_heatmap_extent_is_scaled_onto_a_smaller_display_frame() -> None:
    """A grid with one hot cell, drawn on a display frame half the source's size: the colour lands on that cell."""
    values = np.zeros((4, 4), np.uint8)
    values[1, 3] = 255  # the cell spanning x 300..400, y 100..200 of a 400 x 400 source
    heatmap = Heatmap(4, 4, values.tobytes(), "lesion", "cam", (0.0, 0.0, 400.0, 400.0))
    display = np.full((200, 200), 128, np.uint8)
    out = overlay_pixels(display, heatmap, 400, 400).astype(int)
    tint = np.abs(out - 128).sum(axis=2)
    row, col = np.unravel_index(int(np.argmax(tint)), tint.shape)
    assert 50 <= row < 100 and 150 <= col < 200  # the same cell, at half the size
