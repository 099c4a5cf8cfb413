"""A completed series' objects for the PACS: one Enhanced SR of its result (TID 1500: per label the series'
evaluation and score, per key image a group referencing it), one Key Object Selection flagging its key images "Of
Interest" in viewers, and a heatmap Secondary Capture per key image. The key images' sources are long gone by
then: what each candidate keeps (key_material: its header without pixels, its frame as shown) is all they are
made of."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import (
    AlgorithmIdentification,
    EnhancedSR,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import DeflatedExplicitVRLittleEndian, EnhancedSRStorage, generate_uid

from appliance.config import PacsConfig
from appliance.delivery.overlay import DISPLAY_SIDE, build_overlay
from appliance.delivery.patient import patient_module, set_patient_module
from appliance.delivery.sr import (
    IMAGING_PROCEDURE,
    NO_UNITS,
    PRIVATE_SCHEME,
    SCORE,
    Device,
    check_source,
    concept,
    encode,
    evidence_header,
    observer_context,
    presence,
    private_scheme,
    referenced_frames,
    series_uid,
    stamp,
)
from appliance.domain.errors import ReportError
from appliance.domain.manifest import Manifest
from appliance.domain.result import Decision, Result
from appliance.domain.series import KeyImage, SeriesResult
from appliance.journal.journal import NewDelivery
from appliance.privacy import hashed

log = logging.getLogger(__name__)

OF_INTEREST = codes.DCM.OfInterest  # CID 7010: the KOS's title, which viewers flag key images by
# How a series score came from its images' (CID 3627), where the combination has a code.
_DERIVATION = {"max": codes.SCT.Maximum, "top_k_mean": codes.SCT.Mean}

# What a kept header need not carry: pixel data and what only describes it (the display frame is kept apart),
# overlays and curves (groups 60xx, 50xx), and the palette and LUT data (an RGB overlay is made of the display).
_DROPPED = frozenset(
    pydicom.datadict.tag_for_keyword(k)
    for k in (
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        "IconImageSequence",
        "WaveformSequence",
        "EncapsulatedDocument",
        "SpectroscopyData",
        "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData",
        "AlphaPaletteColorLookupTableData",
        "SegmentedRedPaletteColorLookupTableData",
        "SegmentedGreenPaletteColorLookupTableData",
        "SegmentedBluePaletteColorLookupTableData",
        "ModalityLUTSequence",
        "VOILUTSequence",
        "DigitalSignaturesSequence",
        "DataSetTrailingPadding",
    )
)
_DROPPED_GROUPS = (0x5000, 0x6000)  # curves (50xx) and overlays (60xx), repeating groups: group & 0xFF00


class KeyMaterial(Protocol):
    """One of a series' kept images as its objects are made of it (appliance.journal.journal.KeyCandidate is one):
    the image's stored result (with its heatmap) and what key_material made of it (None where nothing was kept)."""

    @property
    def image(self) -> Result: ...

    @property
    def header(self) -> bytes | None: ...

    @property
    def display(self) -> bytes | None: ...


@dataclass(frozen=True)
class _Key:
    """A key image with its header read back."""

    number: int  # 1-based rank among the series' key images
    key: KeyImage
    image: Result
    header: pydicom.Dataset
    display: bytes | None


def series_report_uid(result: SeriesResult, device_uid: str) -> str:
    """The series SR's SOP Instance UID: the same for the same series, revision, model version and appliance, so a
    result rebuilt after a crash is the same instance (the outbox and the PACS keep it once)."""
    return str(generate_uid(entropy_srcs=["appliance series report", *_identity(result, device_uid)]))


def key_objects_uid(result: SeriesResult, device_uid: str) -> str:
    """The KOS's SOP Instance UID, deterministic as series_report_uid."""
    return str(generate_uid(entropy_srcs=["appliance key objects", *_identity(result, device_uid)]))


def key_objects_series_uid(study_uid: str, model_name: str, device_uid: str) -> str:
    """The appliance's key object series in a study: one per model and appliance, the same on every rebuild."""
    return str(generate_uid(entropy_srcs=["appliance key object series", study_uid, model_name, device_uid]))


def _identity(result: SeriesResult, device_uid: str) -> list[str]:
    by = result.scored_by
    return [
        result.study_instance_uid,
        result.series_instance_uid,
        str(result.revision),
        by.model_name,
        by.model_version,
        device_uid,
    ]


# --- what a candidate keeps ---------------------------------------------------------------------------------------


def encode_header(source: pydicom.Dataset, frame_index: int = 0) -> bytes:
    """``source`` (read without pixels) as kept for its series: no private elements, nothing pixel-like, and of a
    multi-frame header's per-frame groups only the frame's (the others empty items, so frames keep their
    numbers); Deflated Explicit VR Little Endian with file meta, which decode_header reads."""
    kept = pydicom.Dataset(
        {
            element.tag: element
            for element in source  # converted: a raw element of an implicit VR source gets its VR here
            if element.tag not in _DROPPED
            and element.tag.group & 0xFF00 not in _DROPPED_GROUPS
            and not element.tag.is_private
        }
    )
    kept.remove_private_tags()  # nested ones too
    frames = kept.get("PerFrameFunctionalGroupsSequence")
    if frames:
        kept.PerFrameFunctionalGroupsSequence = [
            item if i == frame_index else pydicom.Dataset() for i, item in enumerate(frames)
        ]
    kept.file_meta = FileMetaDataset()
    kept.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    for meta, keyword in (("MediaStorageSOPClassUID", "SOPClassUID"), ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        if keyword in kept:
            setattr(kept.file_meta, meta, kept[keyword].value)
    kept.preamble = b"\0" * 128
    buffer = io.BytesIO()
    # Not enforced: a header lacking its UIDs is kept all the same, and refused with a sentence when used.
    pydicom.dcmwrite(buffer, kept, enforce_file_format=False)
    return buffer.getvalue()


def decode_header(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def encode_display(frame: np.ndarray) -> bytes:
    """A display frame (8-bit, H x W gray or H x W x 3, at most DISPLAY_SIDE) as a lossless PNG, fast to write."""
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise ReportError("The display frame is not an 8-bit gray or 3-channel image.")
    if min(frame.shape[:2]) < 1 or max(frame.shape[:2]) > DISPLAY_SIDE:
        raise ReportError(f"The display frame is empty or over {DISPLAY_SIDE} pixels on a side.")
    # cv2 takes 3 channels as BGR and gives them back so: the array's order round-trips as it is.
    ok, png = cv2.imencode(".png", np.ascontiguousarray(frame), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ReportError("The display frame could not be encoded as PNG.")
    return png.tobytes()


def decode_display(data: bytes) -> np.ndarray:
    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if frame is None or frame.dtype != np.uint8:
        raise ReportError("The kept display frame is not an 8-bit PNG.")
    return frame


# --- the documents ------------------------------------------------------------------------------------------------


def build_series_report(
    result: SeriesResult,
    keys: Sequence[_Key],
    evidence: Sequence[pydicom.Dataset],
    manifest: Manifest,
    device: Device,
    *,
    series_number: int,
) -> pydicom.Dataset:
    """The series' Enhanced SR: per label a series-level group (its evaluation under the series' decision, its
    series score), per key image an image-level group referencing it (its score for the key label). ``evidence``:
    headers of the series, the key images' first (the first gives the patient and study)."""
    patient = patient_module(evidence[0])
    documents = _evidence(evidence, patient)
    sop_uid = series_report_uid(result, device.uid)
    when = datetime.fromtimestamp(result.created_unix_ms / 1000)
    labels = manifest.output.labels
    concepts = {label: concept(label, manifest) for label in labels}
    scores = {s.label: s.score for s in result.scores}
    by = result.scored_by
    try:
        algorithm = AlgorithmIdentification(name=by.model_name, version=by.model_version)
        derivation = _DERIVATION.get(manifest.series.combine)
        groups = [
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=generate_uid(entropy_srcs=[sop_uid, label]), identifier=label
                ),
                algorithm_id=algorithm,
                finding_type=code,
                # No source image: the group is about every image of the document (the series).
                qualitative_evaluations=[
                    QualitativeEvaluation(name=code, value=presence(label, result.decision, result.findings))
                ],
                measurements=[Measurement(name=SCORE, value=scores[label], unit=NO_UNITS, derivation=derivation)],
            )
            for label, code in concepts.items()
        ]
        label = result.key_label
        for key in keys:
            image = SourceImageForMeasurementGroup.from_source_image(
                documents[str(key.header.SOPInstanceUID)],
                referenced_frame_numbers=referenced_frames(key.header, key.image),
            )
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=TrackingIdentifier(
                        uid=generate_uid(entropy_srcs=[sop_uid, label, "key image", str(key.number)]),
                        identifier=f"{label}: key image {key.number}",
                    ),
                    algorithm_id=algorithm,
                    finding_type=concepts[label],
                    source_images=[image],
                    qualitative_evaluations=[
                        QualitativeEvaluation(
                            name=concepts[label], value=presence(label, key.image.decision, key.image.findings)
                        )
                    ],
                    measurements=[Measurement(name=SCORE, value=key.key.score, unit=NO_UNITS)],
                )
            )
        content = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer_context(device)),
            procedure_reported=IMAGING_PROCEDURE,
            imaging_measurements=groups,
        )
        private = any(c.scheme_designator == PRIVATE_SCHEME for c in concepts.values())
        report = EnhancedSR(
            evidence=list(documents.values()),
            content=content[0],
            series_instance_uid=series_uid(result.study_instance_uid, by.model_name, device.uid),
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=result.revision,
            manufacturer=device.manufacturer,
            is_complete=True,
            manufacturer_model_name=device.model_name,
            software_versions=device.software_version,
            series_description=f"AI series result: {by.model_name}"[:64],
            content_date=when.date(),
            content_time=when.time(),
            coding_schemes=[private_scheme(device)] if private else None,
            previous_versions=_predecessor(result, device) or None,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        # highdicom's text may quote header values (patient data): the sentence names the type only.
        raise ReportError(
            f"highdicom could not build the series report from these headers ({type(e).__name__})."
        ) from e
    set_patient_module(report, patient)
    stamp(report, when)
    return report


def build_key_objects(
    result: SeriesResult,
    keys: Sequence[_Key],
    device: Device,
    *,
    series_number: int,
) -> pydicom.Dataset:
    """The Key Object Selection ("Of Interest") referencing the series' key images, their frames where
    multi-frame, saying in words what the model decided for which label."""
    patient = patient_module(keys[0].header)
    documents = _evidence([k.header for k in keys], patient)
    frames: dict[str, list[int]] = {}
    for key in keys:
        numbers = referenced_frames(key.header, key.image)
        frames.setdefault(str(key.header.SOPInstanceUID), []).extend(numbers or [])
    when = datetime.fromtimestamp(result.created_unix_ms / 1000)
    by = result.scored_by
    try:
        content = KeyObjectSelection(
            document_title=OF_INTEREST,
            referenced_objects=list(documents.values()),
            observer_device_context=observer_context(device),
            description=describe(result),
        )
        for item in content[0].ContentSequence:
            if item.ValueType == "IMAGE":
                reference = item.ReferencedSOPSequence[0]
                numbers = frames.get(str(reference.ReferencedSOPInstanceUID))
                if numbers:
                    reference.ReferencedFrameNumber = sorted(numbers)
        document = KeyObjectSelectionDocument(
            evidence=list(documents.values()),
            content=content,
            series_instance_uid=key_objects_series_uid(result.study_instance_uid, by.model_name, device.uid),
            series_number=series_number,
            sop_instance_uid=key_objects_uid(result, device.uid),
            instance_number=result.revision,
            manufacturer=device.manufacturer,
            manufacturer_model_name=device.model_name,
            software_versions=device.software_version,
            series_description=f"AI key images: {by.model_name}"[:64],
            content_date=when.date(),
            content_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ReportError(
            f"highdicom could not build the key object selection from these headers ({type(e).__name__})."
        ) from e
    set_patient_module(document, patient)
    stamp(document, when)
    return document


_DECISION_WORDS = {
    Decision.POSITIVE: "positive",
    Decision.NEGATIVE: "negative",
    Decision.INDETERMINATE: "indeterminate",
}


def describe(result: SeriesResult) -> str:
    """The KOS's Key Object Description: the model, its decision and the key images' label."""
    by = result.scored_by
    text = (
        f"Key images of {by.model_name} {by.model_version}: {_DECISION_WORDS[result.decision]} for {result.key_label}"
    )
    return text[:1024]


def _evidence(headers: Sequence[pydicom.Dataset], patient: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """Each instance once (frames of one multi-frame instance share its header), as a document's evidence."""
    out: dict[str, pydicom.Dataset] = {}
    for header in headers:
        out.setdefault(str(header.SOPInstanceUID), evidence_header(header, patient))
    return out


def _predecessor(result: SeriesResult, device: Device) -> list[pydicom.Dataset]:
    """The SR this revision supersedes: in the same report series (a series' SRs are all of one model)."""
    if result.revision <= 1 or not result.revises_report_uid:
        return []
    earlier = pydicom.Dataset()
    earlier.StudyInstanceUID = result.study_instance_uid
    earlier.SeriesInstanceUID = series_uid(result.study_instance_uid, result.scored_by.model_name, device.uid)
    earlier.SOPClassUID = EnhancedSRStorage
    earlier.SOPInstanceUID = result.revises_report_uid
    return [earlier]


# --- for the outbox -----------------------------------------------------------------------------------------------


class SeriesReports:
    """The series' objects for the outbox (Reports delegates to it where `pacs.report_per` is "series")."""

    def __init__(self, pacs: PacsConfig, device: Device) -> None:
        self.pacs = pacs
        self.device = device

    def key_material(
        self, input_id: int, path: Path, result: Result, display: np.ndarray | None
    ) -> tuple[bytes, bytes | None] | None:
        """What a scored DICOM image that may become a key image keeps of itself: its header (encode_header) and
        its frame as shown (encode_display) where it has a heatmap and overlays are on. None, saying why, where
        the header cannot be read again."""
        try:
            header = encode_header(pydicom.dcmread(path, stop_before_pixels=True), result.frame_index)
        except Exception as e:  # the type only: a header's values are patient data
            log.warning(
                "input %d: nothing kept for its series' key images: its header could not be read again (%s)",
                input_id,
                type(e).__name__,
            )
            return None
        if display is None or result.heatmap is None or not self.pacs.overlays:
            return header, None
        try:
            return header, encode_display(display)
        except ReportError as e:
            log.warning(
                "input %d frame %d: no heatmap kept for its series: %s", input_id, result.frame_index, e.message
            )
            return header, None

    def for_series(
        self, result: SeriesResult, keys: Sequence[KeyMaterial], manifest: Manifest
    ) -> tuple[NewDelivery, ...]:
        """The series' SR, then its KOS, then a heatmap Secondary Capture per key image kept with its frame as
        shown (at most `series.key_images`). ``keys``: the series' kept candidates (any order; those of
        ``result.key_images`` are used). A key image whose header is missing or unfit is left out, saying why;
        without any fit header nothing is made. Never raises: what cannot be made is said and left out, and
        without its SR nothing goes."""
        name = hashed(result.series_instance_uid)
        try:
            _check(result, manifest)
            usable = self._usable(name, result, keys, manifest)
        except ReportError as e:
            log.warning("series %s: no objects for the PACS: %s", name, e.message)
            return ()
        chosen = self._keys(result, usable, manifest.series.key_images)
        headers = [k.header for k in chosen] or [h for _, h in usable[:1]]
        if not headers:
            log.warning("series %s: no objects for the PACS: no header of its images was kept fit to use", name)
            return ()
        report = self._made(
            name,
            "series report",
            lambda: build_series_report(
                result, chosen, headers, manifest, self.device, series_number=self.pacs.series_number
            ),
        )
        if report is None:
            return ()
        out = [report]
        referenced = (report.sop_class_uid, report.sop_instance_uid)
        if chosen:
            kos = self._made(
                name,
                "key object selection",
                lambda: build_key_objects(result, chosen, self.device, series_number=self.pacs.series_number + 2),
            )
            out += [kos] if kos is not None else []
        for key in chosen if self.pacs.overlays else ():
            if key.display is None or key.image.heatmap is None:
                continue  # no frame kept (its heatmap went with an earlier revision), or no heatmap
            overlay = self._made(
                name,
                f"overlay of key image {key.number}",
                partial(self._overlay, key, key.display, manifest, referenced),
            )
            out += [overlay] if overlay is not None else []
        return tuple(out)

    def _overlay(self, key: _Key, display: bytes, manifest: Manifest, report: tuple[str, str]) -> pydicom.Dataset:
        """The key image's heatmap over its frame as shown, referencing the series' SR; its UID is the image
        result's (overlay.instance_uid), so a revision's same key image is the same instance, sent once."""
        return build_overlay(
            key.header,
            key.image,
            decode_display(display),
            manifest,
            self.device,
            series_number=self.pacs.series_number + 1,
            report=report,
        )

    def _usable(
        self, name: str, result: SeriesResult, keys: Sequence[KeyMaterial], manifest: Manifest
    ) -> list[tuple[KeyMaterial, pydicom.Dataset]]:
        """The candidates whose header reads back and is their image's, of this series."""
        out = []
        for number, key in enumerate(keys, 1):
            if key.header is None:
                continue
            try:
                header = decode_header(key.header)
                check_source(header, key.image, manifest, "a series report")
                if (header.StudyInstanceUID, header.SeriesInstanceUID) != (
                    result.study_instance_uid,
                    result.series_instance_uid,
                ):
                    raise ReportError("The kept header is of another series than the result's.")
            except ReportError as e:
                log.warning("series %s: candidate %d left out: %s", name, number, e.message)
                continue
            except Exception as e:  # the type only: a header's values are patient data
                log.warning("series %s: candidate %d left out: its header does not read back (%s)", name, number,
                            type(e).__name__)  # fmt: skip
                continue
            out.append((key, header))
        return out

    def _keys(self, result: SeriesResult, usable: list[tuple[KeyMaterial, pydicom.Dataset]], most: int) -> list[_Key]:
        """The result's key images (best first, ``most`` at most) found among the usable candidates: by their image
        result's sequence number, else by SOP instance and frame."""
        out = []
        for number, key in enumerate(result.key_images[:most], 1):
            found = next(
                (
                    (m, h)
                    for m, h in usable
                    if (key.sequence and m.image.sequence == key.sequence)
                    or (
                        not key.sequence
                        and (m.image.ids.sop_instance_uid, m.image.frame_index)
                        == (key.sop_instance_uid, key.frame_index)
                    )
                ),
                None,
            )
            if found is None:
                log.warning(
                    "series %s: key image %d left out: no fit header was kept for it",
                    hashed(result.series_instance_uid),
                    number,
                )
                continue
            material, header = found
            out.append(_Key(number, key, material.image, header, material.display))
        return out

    def _made(self, name: str, what: str, make: Callable[[], pydicom.Dataset]) -> NewDelivery | None:
        try:
            made = make()
            return NewDelivery(str(made.SOPClassUID), str(made.SOPInstanceUID), encode(made))
        except ReportError as e:
            log.warning("series %s: no %s for the PACS: %s", name, what, e.message)
        except Exception as e:  # the type only (no header data); the rest still goes
            log.error("series %s: no %s for the PACS: %s while making it", name, what, type(e).__name__)
        return None


def _check(result: SeriesResult, manifest: Manifest) -> None:
    by = result.scored_by
    if (by.model_name, by.model_version) != (manifest.model.name, manifest.model.version):
        raise ReportError("The manifest given is not that of the model that scored the series.")
    if sorted(s.label for s in result.scores) != sorted(manifest.output.labels):
        raise ReportError("The series result's labels are not those its manifest names.")
    if not (result.study_instance_uid and result.series_instance_uid):
        raise ReportError("The series result lacks its study or series UID.")
    if result.key_label and result.key_label not in manifest.output.labels:
        raise ReportError("The series' key label is not one its manifest names.")
