"""A scored result of a DICOM image as a DICOM Enhanced SR: a TID 1500 measurement report (made with highdicom)
that a PACS shows beside the image it is about, in a series of the appliance's own."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    DeviceObserverIdentifyingAttributes,
    EnhancedSR,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DT

from appliance.delivery.patient import highdicom_header, patient_module, set_patient_module
from appliance.domain.errors import ReportError
from appliance.domain.manifest import Manifest
from appliance.domain.result import Decision, Outcome, Result

# Labels the manifest gives no code get one of the appliance's own scheme, declared in each report that uses it.
PRIVATE_SCHEME = "99APPLNC"
PRIVATE_SCHEME_NAME = "Imaging appliance model labels"  # not registered, so it has no Coding Scheme UID

# CID 240 (Present-Absent) as pydicom's code dictionary holds it: SCT 52101004, 272519000 and 373068000.
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
UNDETERMINED = codes.SCT.Undetermined  # the argmax rule's top label when it falls short of the threshold
# The label's score as the model gave it; "probability" would claim a calibration it does not have.
SCORE = codes.SCT.Score
NO_UNITS = codes.UCUM.NoUnits  # UCUM "1"
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure  # CID 100
DEVICE = codes.DCM.Device  # CID 270: the observer is a device, not a person

_PRIVATE_VALUE = re.compile(r"[A-Za-z0-9._-]{1,16}")
# Type 2 study attributes highdicom reads from the source without a default: an anonymised header may lack them,
# and a report still needs them, empty (the patient's are patient_module's).
_TYPE2_FROM_SOURCE = (
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class Device:
    """The appliance as the reports' observer and creator."""

    uid: str  # Device Observer UID: the same for every report of this appliance
    name: str
    manufacturer: str
    model_name: str
    software_version: str


def series_uid(study_uid: str, model_name: str, device_uid: str) -> str:
    """The appliance's report series in a study: one per model and appliance, the same on every rebuild."""
    return str(generate_uid(entropy_srcs=["appliance report series", study_uid, model_name, device_uid]))


def instance_uid(result: Result, device_uid: str) -> str:
    """The same for a result rebuilt from the same bytes and frame by the same model version (a PACS keeps the
    first copy of an instance, so a resend after a crash is harmless); new for a new model version."""
    by = result.scored_by
    parts = [result.input.content_hash, str(result.frame_index), by.model_name, by.model_version, device_uid]
    return str(generate_uid(entropy_srcs=["appliance report", *parts]))


def build_report(
    source: pydicom.Dataset, result: Result, manifest: Manifest, device: Device, *, series_number: int
) -> pydicom.Dataset:
    """The Enhanced SR of one scored frame of ``source`` (its header, read without pixels)."""
    _check(source, result, manifest)
    patient = patient_module(source)
    evidence = evidence_header(source, patient)
    sop_uid = instance_uid(result, device.uid)
    when = datetime.fromtimestamp(result.created_unix_ms / 1000)  # local time, as DICOM dates are
    labels = manifest.output.labels
    concepts = [concept(label, manifest) for label in labels]
    try:
        algorithm = AlgorithmIdentification(name=result.scored_by.model_name, version=result.scored_by.model_version)
        observer = observer_context(device)
        image = SourceImageForMeasurementGroup.from_source_image(
            evidence, referenced_frame_numbers=referenced_frames(source, result)
        )
        scores = {s.label: s.score for s in result.scores}
        groups = [
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=generate_uid(entropy_srcs=[sop_uid, label]), identifier=label
                ),
                algorithm_id=algorithm,
                finding_type=code,
                source_images=[image],
                qualitative_evaluations=[
                    QualitativeEvaluation(name=code, value=presence(label, result.decision, result.findings))
                ],
                # The group names the algorithm for all it holds (TID 1501): not repeated per measurement.
                measurements=[Measurement(name=SCORE, value=scores[label], unit=NO_UNITS)],
            )
            for label, code in zip(labels, concepts, strict=True)
        ]
        content = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=IMAGING_PROCEDURE,
            imaging_measurements=groups,
        )
        private = any(c.scheme_designator == PRIVATE_SCHEME for c in concepts)
        report = EnhancedSR(
            evidence=[evidence],
            content=content[0],
            series_instance_uid=series_uid(source.StudyInstanceUID, result.scored_by.model_name, device.uid),
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number_of(source, result),
            manufacturer=device.manufacturer,
            is_complete=True,
            manufacturer_model_name=device.model_name,
            software_versions=device.software_version,
            series_description=f"AI results: {result.scored_by.model_name}"[:64],
            content_date=when.date(),
            content_time=when.time(),
            coding_schemes=[private_scheme(device)] if private else None,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        # highdicom's text may quote header values (patient data): the sentence names the type only.
        raise ReportError(f"highdicom could not build the report from this header ({type(e).__name__}).") from e
    set_patient_module(report, patient)  # as the overlay of the same image says it
    stamp(report, when)
    return report


def evidence_header(source: pydicom.Dataset, patient: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` as a document's evidence (highdicom_header's copy, so the Type 2 fillers stay out of the
    caller's header): the study's Type 2 attributes highdicom reads without a default are there, empty if need be."""
    evidence = highdicom_header(source, patient)
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    return evidence


def observer_context(device: Device) -> ObserverContext:
    """The appliance as the observing device (TID 1002)."""
    return ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device.uid, name=device.name, manufacturer_name=device.manufacturer, model_name=device.model_name
        ),
    )


def stamp(document: pydicom.Dataset, when: datetime) -> None:
    """The scoring time, not the build time, wherever highdicom stamps "now": a document rebuilt after a crash is
    the same object, byte for byte."""
    document.InstanceCreationDate = document.ContentDate
    document.InstanceCreationTime = document.ContentTime
    for equipment in document.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = DT(when)


def encode(report: pydicom.Dataset) -> bytes:
    """The report as a DICOM Part 10 file (preamble, file meta)."""
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _check(source: pydicom.Dataset, result: Result, manifest: Manifest) -> None:
    if result.outcome is not Outcome.SCORED or result.decision is None:
        raise ReportError("Only a scored result has a report; this one was rejected.")
    check_source(source, result, manifest, "a report")
    if sorted(s.label for s in result.scores) != sorted(manifest.output.labels):
        raise ReportError("The result's labels are not those its manifest names.")
    if not 0 <= result.frame_index < max(result.frame_count, 1):
        raise ReportError("The result's frame index lies outside its frame count.")


def check_source(
    source: pydicom.Dataset, result: Result, manifest: Manifest, made: str, needs: tuple[str, ...] = ()
) -> None:
    """What every object made for a result checks first: the source's header is the scored image's and has what
    the object references, and the manifest is the scoring model's. ``made``: "a report", "an overlay"."""
    missing = [k for k in (*_REFERENCED, *needs) if not str(source.get(k, "") or "").strip()]
    if missing:
        raise ReportError(f"The source's header lacks {', '.join(missing)}, which {made} must reference.")
    if result.ids.sop_instance_uid and result.ids.sop_instance_uid != source.SOPInstanceUID:
        raise ReportError("The header given is not that of the image the result is about (another SOP Instance UID).")
    by = result.scored_by
    if (by.model_name, by.model_version) != (manifest.model.name, manifest.model.version):
        raise ReportError("The manifest given is not that of the model that scored the result.")


def referenced_frames(source: pydicom.Dataset, result: Result) -> list[int] | None:
    """The frame the result is about (1-based), for a multi-frame source only."""
    try:
        frames = int(source.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if max(frames, result.frame_count) <= 1:
        return None
    if result.frame_index >= frames:
        raise ReportError("The result's frame is not in the source (its Number of Frames is smaller).")
    return [result.frame_index + 1]


def instance_number_of(source: pydicom.Dataset, result: Result) -> int:
    """A multi-frame source's report is numbered by its frame; a single image's takes the image's own number,
    so the reports list in the order of the images they are about."""
    if result.frame_count > 1:
        return result.frame_index + 1
    try:
        number = int(source.get("InstanceNumber", 1) or 1)
    except (TypeError, ValueError):
        return 1
    return number if 1 <= number < 2**31 else 1


def presence(label: str, decision: Decision | None, findings: Sequence[str]) -> Code:
    """The label's qualitative evaluation (CID 240) under a decision and its findings: an image's or a series'."""
    if decision is Decision.INDETERMINATE:
        return UNDETERMINED if tuple(findings[:1]) == (label,) else ABSENT
    return PRESENT if label in findings else ABSENT


def concept(label: str, manifest: Manifest) -> CodedConcept:
    """The label's finding code: the manifest's, else one of the appliance's private scheme (see private_scheme)."""
    given = manifest.output.codes.get(label)
    if given is not None:
        return CodedConcept(given.value, given.scheme, given.meaning)
    return CodedConcept(_private_value(label), PRIVATE_SCHEME, _meaning(label))


def _private_value(label: str) -> str:
    # A Code Value is at most 16 characters (longer ones become Long Code Value, which many PACS ignore): the
    # label itself where it fits, else a stable digest of it.
    if _PRIVATE_VALUE.fullmatch(label):
        return label
    return "L" + hashlib.sha256(label.encode("utf-8")).hexdigest()[:15]


def _meaning(label: str) -> str:
    text = "".join(c for c in label if c != "\\" and ord(c) >= 32).strip()  # LO: no backslash, no control
    return (text or "label")[:64]


def private_scheme(device: Device) -> CodingSchemeIdentificationItem:
    """The private scheme's declaration, for a document using any of its codes."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=device.manufacturer[:64],
    )
