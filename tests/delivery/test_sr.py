"""Results as DICOM Enhanced SRs (TID 1500): read back with pydicom, and checked by dciodvfy where installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.multival import MultiValue
from pydicom.uid import EnhancedSRStorage

from appliance.delivery.sr import PRIVATE_SCHEME, Device, build_report, encode
from appliance.domain.errors import ReportError
from appliance.domain.manifest import Manifest, load_manifest
from appliance.domain.result import Decision, InputFacts, Result, Timings
from appliance.imaging.types import ImageMeta
from appliance.inference.postprocess import decide
from appliance.scoring.job import Scorer
from appliance.scoring.results import rejected, scored

REPO = Path(__file__).resolve().parents[2]
BRAIN = load_manifest(REPO / "models" / "brain-mri-vgg16", require_onnx=False).manifest
PIPELINE = load_manifest(REPO / "models" / "pipeline-test", require_onnx=False).manifest
DEVICE = Device(
    uid="1.2.826.0.1.3680043.8.498.1",
    name="edge-1",
    manufacturer="Imaging appliance",
    model_name="Edge",
    software_version="1.4",
)
HASH = "ab" * 32

# Concept names of TID 1500/1501 (PS3.16) the checks below look for.
MEASUREMENT_GROUP = ("125007", "DCM")
FINDING = ("121071", "DCM")
TRACKING_IDENTIFIER = ("112039", "DCM")
SOURCE_OF_MEASUREMENT = ("121112", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
SCORE = ("246262008", "SCT")
PRESENT, ABSENT, UNDETERMINED = ("52101004", "SCT"), ("272519000", "SCT"), ("373068000", "SCT")


def header(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return pydicom.dcmread(path, stop_before_pixels=True)


def result_for(
    source: pydicom.Dataset,
    manifest: Manifest,
    scores: list[float],
    *,
    frame_index: int = 0,
    frame_count: int = 1,
    content_hash: str = HASH,
) -> Result:
    """A result as the daemon's one result builder makes it, with the manifest's own decision rule."""
    meta = ImageMeta(
        "dicom",
        source.StudyInstanceUID,
        source.SeriesInstanceUID,
        source.SOPInstanceUID,
        source.get("AccessionNumber", ""),
    )
    facts = InputFacts(7, "dicom", "x.dcm", content_hash)
    decided = decide(np.array(scores), manifest)
    return scored(facts, Scorer(manifest, "onnxruntime"), meta, decided, Timings(), frame_index, frame_count)


def items(container: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    yield from container.get("ContentSequence", [])


def concept(item: pydicom.Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodeValue, code.CodingSchemeDesignator


def groups(report: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """The measurement groups by tracking identifier (the label)."""
    out = {}
    for container in items(report):
        for group in items(container):
            if group.ValueType == "CONTAINER" and concept(group) == MEASUREMENT_GROUP:
                label = next(i.TextValue for i in items(group) if concept(i) == TRACKING_IDENTIFIER)
                out[label] = group
    return out


@dataclass(frozen=True)
class Group:
    """What one measurement group says of its label."""

    finding: tuple[str, str]  # (code value, scheme)
    finding_meaning: str
    value: tuple[str, str]  # the qualitative evaluation: present, absent or undetermined
    score: float
    unit: tuple[str, str]
    sop: str  # the image it is about
    sop_class: str
    frames: list[int]
    algorithm: tuple[str, str]  # name, version


def group_facts(group: pydicom.Dataset) -> Group:
    finding = next(i.ConceptCodeSequence[0] for i in items(group) if concept(i) == FINDING)
    finding_code = (finding.CodeValue, finding.CodingSchemeDesignator)
    evaluation = next(i for i in items(group) if i.ValueType == "CODE" and concept(i) == finding_code)
    measured = next(i for i in items(group) if i.ValueType == "NUM" and concept(i) == SCORE).MeasuredValueSequence[0]
    unit = measured.MeasurementUnitsCodeSequence[0]
    image = next(i for i in items(group) if concept(i) == SOURCE_OF_MEASUREMENT).ReferencedSOPSequence[0]
    value = evaluation.ConceptCodeSequence[0]
    return Group(
        finding=finding_code,
        finding_meaning=finding.CodeMeaning,
        value=(value.CodeValue, value.CodingSchemeDesignator),
        score=float(measured.NumericValue),
        unit=(unit.CodeValue, unit.CodingSchemeDesignator),
        sop=image.ReferencedSOPInstanceUID,
        sop_class=image.ReferencedSOPClassUID,
        frames=_numbers(image.get("ReferencedFrameNumber")),
        algorithm=(
            next(i.TextValue for i in items(group) if concept(i) == ALGORITHM_NAME),
            next(i.TextValue for i in items(group) if concept(i) == ALGORITHM_VERSION),
        ),
    )


def _numbers(value: object) -> list[int]:
    """A multi-valued IS as a list: pydicom gives one value bare, several as a MultiValue."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, MultiValue) else [int(str(value))]


def all_codes(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every coded entry anywhere in the object (a dataset holding a Coding Scheme Designator)."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                if "CodingSchemeDesignator" in item and ("CodeValue" in item or "LongCodeValue" in item):
                    yield item
                yield from all_codes(item)


def reread(report: pydicom.Dataset) -> pydicom.Dataset:
    """The report as a receiver reads it: encoded and parsed again."""
    return pydicom.dcmread(BytesIO(encode(report)))


# --- what a report says ----------------------------------------------------------------------


def test_a_positive_ct_result_references_its_image_in_a_series_of_the_appliance() -> None:
    source = header("CT_small.dcm")
    result = result_for(source, BRAIN, [0.7, 0.1, 0.1, 0.1])
    assert result.decision is Decision.POSITIVE and result.findings == ("glioma",)
    sr = reread(build_report(source, result, BRAIN, DEVICE, series_number=9001))

    assert sr.Modality == "SR" and sr.SOPClassUID == EnhancedSRStorage
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ContentTemplateSequence[0].MappingResource == "DCMR"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    # The study is the source's (with its patient), the series the appliance's own.
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID and sr.PatientName == source.PatientName
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SeriesNumber == 9001
    assert sr.SOPInstanceUID not in (source.SOPInstanceUID, sr.SeriesInstanceUID)
    assert sr.Manufacturer == DEVICE.manufacturer and sr.SoftwareVersions == DEVICE.software_version
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (referenced.ReferencedSOPClassUID, referenced.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    # The appliance as the observing device.
    observer = {concept(i): i for i in items(sr) if i.RelationshipType == "HAS OBS CONTEXT"}
    assert observer[("121005", "DCM")].ConceptCodeSequence[0].CodeValue == "121007"  # observer type: device
    assert DEVICE.uid == observer[("121012", "DCM")].UID
    assert observer[("121013", "DCM")].TextValue == DEVICE.name
    assert observer[("121014", "DCM")].TextValue == DEVICE.manufacturer
    assert observer[("121015", "DCM")].TextValue == DEVICE.model_name

    found = {label: group_facts(g) for label, g in groups(sr).items()}
    assert list(found) == BRAIN.output.labels
    expected = {
        "glioma": (PRESENT, 0.7),
        "meningioma": (ABSENT, 0.1),
        "notumor": (ABSENT, 0.1),
        "pituitary": (ABSENT, 0.1),
    }
    for label, (value, score) in expected.items():
        facts = found[label]
        assert facts.value == value, label
        assert facts.score == pytest.approx(score)
        assert facts.unit == ("1", "UCUM")
        assert facts.algorithm == ("brain-mri-vgg16", "0.1.1")
        assert (facts.sop, facts.sop_class, facts.frames) == (source.SOPInstanceUID, source.SOPClassUID, [])
        # No code in the manifest: the appliance's private scheme, named after the label.
        assert facts.finding == (label, PRIVATE_SCHEME) and facts.finding_meaning == label


def test_the_private_scheme_is_declared_and_every_code_value_fits_a_short_string() -> None:
    source = header("CT_small.dcm")
    sr = reread(build_report(source, result_for(source, BRAIN, [0.7, 0.1, 0.1, 0.1]), BRAIN, DEVICE, series_number=1))
    declared = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
    assert list(declared) == [PRIVATE_SCHEME]
    assert declared[PRIVATE_SCHEME].CodingSchemeName and declared[PRIVATE_SCHEME].CodingSchemeResponsibleOrganization
    coded = list(all_codes(sr))
    assert coded and all("LongCodeValue" not in c and len(c.CodeValue) <= 16 for c in coded)
    schemes = {c.CodingSchemeDesignator for c in coded}
    assert schemes - {"DCM", "SCT", "UCUM", "RFC5646"} == {PRIVATE_SCHEME}


def test_a_code_from_the_manifest_is_used_and_no_private_scheme_is_declared() -> None:
    # models/pipeline-test names its one label's code: SCT 52988006 "Lesion".
    source = header("MR_small.dcm")
    negative = result_for(source, PIPELINE, [0.2])
    assert negative.decision is Decision.NEGATIVE and negative.findings == ()
    sr = reread(build_report(source, negative, PIPELINE, DEVICE, series_number=9001))
    facts = group_facts(groups(sr)["lesion"])
    assert facts.finding == ("52988006", "SCT") and facts.finding_meaning == "Lesion"
    assert facts.value == ABSENT and facts.score == pytest.approx(0.2)
    assert facts.algorithm == ("pipeline-test", "1.0.0")
    assert "CodingSchemeIdentificationSequence" not in sr
    assert sr.StudyInstanceUID == source.StudyInstanceUID and facts.sop == source.SOPInstanceUID

    positive = result_for(source, PIPELINE, [0.93])
    facts = group_facts(groups(reread(build_report(source, positive, PIPELINE, DEVICE, series_number=9001)))["lesion"])
    assert facts.value == PRESENT and facts.score == pytest.approx(0.93)


def test_an_indeterminate_result_says_undetermined_for_its_top_label() -> None:
    source = header("MR_small.dcm")
    result = result_for(source, BRAIN, [0.3, 0.4, 0.2, 0.1])  # the top score is under the threshold (0.5)
    assert result.decision is Decision.INDETERMINATE and result.findings == ("meningioma",)
    found = {
        label: group_facts(g).value
        for label, g in groups(reread(build_report(source, result, BRAIN, DEVICE, series_number=1))).items()
    }
    assert found == {"glioma": ABSENT, "meningioma": UNDETERMINED, "notumor": ABSENT, "pituitary": ABSENT}


def test_a_negative_label_that_makes_the_decision_is_present() -> None:
    source = header("MR_small.dcm")
    result = result_for(source, BRAIN, [0.05, 0.05, 0.85, 0.05])
    assert result.decision is Decision.NEGATIVE and result.findings == ("notumor",)
    found = {
        label: group_facts(g).value
        for label, g in groups(reread(build_report(source, result, BRAIN, DEVICE, series_number=1))).items()
    }
    assert found == {"glioma": ABSENT, "meningioma": ABSENT, "notumor": PRESENT, "pituitary": ABSENT}


def test_a_frame_of_a_multi_frame_image_is_referenced_by_its_number() -> None:
    source = header("emri_small.dcm")
    frames = int(source.NumberOfFrames)
    assert frames > 3
    result = result_for(source, PIPELINE, [0.8], frame_index=3, frame_count=frames)
    sr = reread(build_report(source, result, PIPELINE, DEVICE, series_number=1))
    facts = group_facts(groups(sr)["lesion"])
    assert facts.frames == [4] and facts.sop == source.SOPInstanceUID  # 1-based in DICOM
    assert sr.InstanceNumber == 4


def test_labels_that_do_not_fit_a_code_value_get_a_short_stable_one(tmp_path: Path) -> None:
    (tmp_path / "model.toml").write_text(
        "[model]\nname='long'\nversion='2'\n[input]\nname='x'\nheight=8\nwidth=8\n"
        "[output]\nname='y'\nactivation='sigmoid'\nlabels=['intracranial haemorrhage (any)', 'ok']\n"
        "[decision]\nrule='threshold'\n"
    )
    manifest = load_manifest(tmp_path, require_onnx=False).manifest
    source = header("CT_small.dcm")
    sr = reread(build_report(source, result_for(source, manifest, [0.9, 0.1]), manifest, DEVICE, series_number=1))
    found = {label: group_facts(g) for label, g in groups(sr).items()}
    long = found["intracranial haemorrhage (any)"]
    assert long.finding_meaning == "intracranial haemorrhage (any)" and long.value == PRESENT
    assert re.fullmatch(r"L[0-9a-f]{15}", str(long.finding[0]))
    assert found["ok"].finding == ("ok", PRIVATE_SCHEME)
    assert all(len(c.CodeValue) <= 16 and "LongCodeValue" not in c for c in all_codes(sr))


def test_a_header_without_patient_attributes_still_gives_a_report() -> None:
    source = header("CT_small.dcm")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        del source[keyword]
    before = set(source.keys())
    sr = reread(build_report(source, result_for(source, BRAIN, [0.1, 0.1, 0.7, 0.1]), BRAIN, DEVICE, series_number=1))
    assert sr.PatientName == "" and sr.PatientID == ""
    assert set(source.keys()) == before  # the caller's header is left as it was


# --- identities ------------------------------------------------------------------------------


def test_uids_are_the_same_for_a_rebuilt_result_and_new_for_a_new_model_version() -> None:
    source = header("CT_small.dcm")
    result = result_for(source, BRAIN, [0.7, 0.1, 0.1, 0.1])

    def build(
        r: Result, src: pydicom.Dataset = source, manifest: Manifest = BRAIN, device: Device = DEVICE
    ) -> pydicom.Dataset:
        return build_report(src, r, manifest, device, series_number=9001)

    first = build(result)
    # Rebuilt after a crash (a new result object, later): the same instance, byte for byte.
    again = build(replace(result))
    assert encode(again) == encode(first)
    # Other bytes: another instance, in the same series.
    other_bytes = build(replace(result, input=replace(result.input, content_hash="cd" * 32)))
    assert other_bytes.SOPInstanceUID != first.SOPInstanceUID
    assert other_bytes.SeriesInstanceUID == first.SeriesInstanceUID
    # Each frame of a multi-frame image: an instance of its own.
    multi = header("emri_small.dcm")
    frames = int(multi.NumberOfFrames)
    per_frame = {
        build(
            result_for(multi, BRAIN, [0.7, 0.1, 0.1, 0.1], frame_index=i, frame_count=frames), src=multi
        ).SOPInstanceUID
        for i in range(frames)
    }
    assert len(per_frame) == frames
    # A new version of the model: a new instance (a PACS keeps the first copy of an instance), same series.
    newer = BRAIN.model_copy(update={"model": BRAIN.model.model_copy(update={"version": "0.2.0"})})
    upgraded = build(replace(result, scored_by=replace(result.scored_by, model_version="0.2.0")), manifest=newer)
    assert upgraded.SOPInstanceUID != first.SOPInstanceUID and upgraded.SeriesInstanceUID == first.SeriesInstanceUID
    # Another model or appliance: another series.
    other_device = build(result, device=replace(DEVICE, uid="1.2.826.0.1.3680043.8.498.2"))
    assert other_device.SeriesInstanceUID != first.SeriesInstanceUID
    assert other_device.SOPInstanceUID != first.SOPInstanceUID
    mr = header("MR_small.dcm")
    by_brain = build(result_for(mr, BRAIN, [0.7, 0.1, 0.1, 0.1]), src=mr)
    by_pipeline = build(result_for(mr, PIPELINE, [0.9]), src=mr, manifest=PIPELINE)
    assert by_brain.SeriesInstanceUID != by_pipeline.SeriesInstanceUID
    # Another study: another series.
    assert by_brain.SeriesInstanceUID != first.SeriesInstanceUID


# --- refusals --------------------------------------------------------------------------------


def test_what_cannot_be_reported_is_refused_with_a_sentence() -> None:
    source = header("CT_small.dcm")
    good = result_for(source, BRAIN, [0.7, 0.1, 0.1, 0.1])
    refused = rejected(good.input, Scorer(BRAIN, "onnxruntime"), ReportError("x"), Timings())
    cases: list[tuple[pydicom.Dataset, Result, Manifest, str]] = [
        (source, refused, BRAIN, "rejected"),
        (source, good, PIPELINE, "not that of the model"),
        (header("MR_small.dcm"), good, BRAIN, "not that of the image"),
        (source, replace(good, frame_index=2, frame_count=2), BRAIN, "frame index"),
        (source, replace(good, frame_index=1, frame_count=2), BRAIN, "not in the source"),
    ]
    no_uid = header("CT_small.dcm")
    del no_uid.SOPInstanceUID
    cases.append((no_uid, replace(good, ids=replace(good.ids, sop_instance_uid="")), BRAIN, "SOPInstanceUID"))
    for src, result, manifest, sentence in cases:
        with pytest.raises(ReportError, match=sentence) as err:
            build_report(src, result, manifest, DEVICE, series_number=1)
        assert err.value.code == "report_failed" and err.value.message.endswith(".")


# --- dciodvfy (dicom3tools) ------------------------------------------------------------------


def _reports() -> list[tuple[str, pydicom.Dataset]]:
    ct, mr, multi = header("CT_small.dcm"), header("MR_small.dcm"), header("emri_small.dcm")
    return [
        (
            "ct-brain-positive",
            build_report(ct, result_for(ct, BRAIN, [0.7, 0.1, 0.1, 0.1]), BRAIN, DEVICE, series_number=9001),
        ),
        (
            "mr-brain-indeterminate",
            build_report(mr, result_for(mr, BRAIN, [0.3, 0.4, 0.2, 0.1]), BRAIN, DEVICE, series_number=9001),
        ),
        ("mr-pipeline-coded", build_report(mr, result_for(mr, PIPELINE, [0.2]), PIPELINE, DEVICE, series_number=9001)),
        (
            "multiframe-frame-4",
            build_report(
                multi,
                result_for(multi, PIPELINE, [0.8], frame_index=3, frame_count=int(multi.NumberOfFrames)),
                PIPELINE,
                DEVICE,
                series_number=9001,
            ),
        ),
    ]


def test_every_report_passes_dciodvfy(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy missing: apt-get install dicom3tools")
    for name, report in _reports():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(encode(report))
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        said = run.stdout + run.stderr
        assert run.returncode == 0, f"{name}:\n{said}"
        assert not [line for line in said.splitlines() if line.startswith("Error")], f"{name}:\n{said}"
        assert "EnhancedSR" in [line.strip() for line in said.splitlines()], said  # the IOD it checked against
