"""A scored result's heatmap as the PACS shows it: an RGB Secondary Capture of the colour map over the image (made
with highdicom), in the scanned study, in a series of the appliance's own beside its reports, referencing the image
it explains and the report of the same result."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import numpy as np
import pydicom
from highdicom.sc import SCImage
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DT, TM

from appliance.delivery.patient import highdicom_header, patient_module, set_patient_module
from appliance.delivery.sr import Device, check_source, instance_number_of, referenced_frames
from appliance.domain.errors import ReportError
from appliance.domain.manifest import Manifest
from appliance.domain.result import Decision, Heatmap, Outcome, Result
from appliance.imaging.overlay import render

# The overlay's longer side at most, in pixels: the daemon asks the preparer for display frames no larger (a
# smaller source keeps its own size). Enough to read on a PACS viewer; 3 MiB of RGB at most per object.
DISPLAY_SIDE = 1024

# PS3.16 codes of the references' purposes: the image the overlay was drawn from (CID 7202), and the report of
# the same result, whose finding the overlay illustrates (CID 7006).
SOURCE_IMAGE = codes.DCM.SourceImageForImageProcessingOperation  # 121322
SOURCE_DOCUMENT = codes.DCM.SourceDocument  # 121335
ACQUISITION = codes.DCM.AcquisitionEquipment  # 109101: the source's scanner, among the contributing equipment

# Patient Orientation's letters for the +x, +y, +z patient axes (LPS) and their opposites.
_AXES = (("L", "R"), ("P", "A"), ("H", "F"))


def series_uid(study_uid: str, model_name: str, device_uid: str) -> str:
    """The appliance's overlay series in a study: one per model and appliance, the same on every rebuild."""
    return str(generate_uid(entropy_srcs=["appliance heatmap series", study_uid, model_name, device_uid]))


def instance_uid(result: Result, device_uid: str) -> str:
    """Like the report's (sr.instance_uid): the same for a result rebuilt from the same bytes, frame and model
    version, so a resend after a crash is the same instance; new for a new model version."""
    by = result.scored_by
    parts = [result.input.content_hash, str(result.frame_index), by.model_name, by.model_version, device_uid]
    return str(generate_uid(entropy_srcs=["appliance heatmap", *parts]))


def overlay_pixels(display: np.ndarray, heatmap: Heatmap, rows: int, columns: int) -> np.ndarray:
    """The overlay at the display frame's size (H x W x 3, 8-bit RGB). The heatmap's extent is in the source's
    pixels (``rows`` x ``columns``); a display frame shrunk from it gets the extent scaled by the same factors."""
    height, width = display.shape[:2]
    sx, sy = width / columns, height / rows
    x0, y0, x1, y1 = heatmap.extent
    return render(display, replace(heatmap, extent=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)))


_DECISION_WORDS = {
    Decision.POSITIVE: "positive",
    Decision.NEGATIVE: "negative",
    Decision.INDETERMINATE: "indeterminate",
    None: "not decided",
}


def describe(result: Result, heatmap: Heatmap) -> str:
    """What the overlay is, for a person reading the header: said in Derivation Description and Image Comments."""
    by = result.scored_by
    method = {"gradcam": "Grad-CAM", "cam": "class activation map"}.get(heatmap.method, heatmap.method)
    return (
        f"Heatmap ({method}) of model {by.model_name} {by.model_version}: where it looked for {heatmap.label}, its "
        f"top label, drawn over the image; the result is {_DECISION_WORDS[result.decision]}. Each map is scaled to "
        "its own peak, so a negative result shows a peak too. Not for diagnosis."
    )


def build_overlay(
    source: pydicom.Dataset,
    result: Result,
    display: np.ndarray,
    manifest: Manifest,
    device: Device,
    *,
    series_number: int,
    report: tuple[str, str],
) -> pydicom.Dataset:
    """The RGB Secondary Capture of one scored frame's heatmap over ``display`` (that frame as shown, 8-bit, at
    most DISPLAY_SIDE), for ``source`` (its header, read without pixels). ``report``: the SOP Class and Instance
    UIDs of the same result's SR, which it references."""
    heatmap = _check(source, result, display, manifest)
    rows, columns = int(source.Rows), int(source.Columns)
    pixels = overlay_pixels(display, heatmap, rows, columns)
    when = datetime.fromtimestamp(result.created_unix_ms / 1000)  # local time, as DICOM dates are
    orientation = _orientation(source, result.frame_index)
    text = describe(result, heatmap)
    patient = patient_module(source)
    try:
        image = SCImage.from_ref_dataset(
            highdicom_header(source, patient),
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid(source.StudyInstanceUID, result.scored_by.model_name, device.uid),
            series_number=series_number,
            sop_instance_uid=instance_uid(result, device.uid),
            instance_number=instance_number_of(source, result),
            manufacturer=device.manufacturer,
            # highdicom requires an orientation for a patient's image; where the source gives none it is emptied
            # below (Type 2 in a Secondary Capture).
            patient_orientation=orientation or ("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=f"AI heatmap: {result.scored_by.model_name}"[:64],
            manufacturer_model_name=device.model_name,
            software_versions=device.software_version,
            content_date=when.date(),
            content_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        # highdicom's text may quote header values (patient data): the sentence names the type only.
        raise ReportError(f"highdicom could not build the overlay from this header ({type(e).__name__}).") from e
    set_patient_module(image, patient)  # as the report of the same image says it
    if orientation is None:
        image["PatientOrientation"].value = None
    # Series-level, and the series holds the overlays of every image of the study (left and right alike): empty.
    image.add_new("Laterality", "CS", None)
    image.BurnedInAnnotation = "YES"  # the colour map is in the pixels: no overlay plane or presentation state
    image.DerivationDescription = text[:1024]
    image.ImageComments = text
    if source.get("LossyImageCompression") == "01":  # once lossy, every image derived from it says so
        image.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                image[keyword] = source[keyword]
    source_image = _reference(str(source.SOPClassUID), str(source.SOPInstanceUID), SOURCE_IMAGE)
    frames = referenced_frames(source, result)
    if frames is not None:
        source_image.ReferencedFrameNumber = frames
    image.SourceImageSequence = [source_image]
    image.ReferencedInstanceSequence = [_reference(*report, SOURCE_DOCUMENT)]
    # The appliance made it on a workstation's behalf, not by digitising anything (highdicom's default: DI).
    image.ConversionType = "WSD"
    image.SecondaryCaptureDeviceManufacturer = device.manufacturer
    image.SecondaryCaptureDeviceManufacturerModelName = device.model_name
    image.SecondaryCaptureDeviceSoftwareVersions = device.software_version
    # The scoring time, not the build time, wherever highdicom stamps "now": an overlay rebuilt after a crash is
    # the same object, byte for byte.
    image.InstanceCreationDate = image.DateOfSecondaryCapture = DA(when.date())
    image.InstanceCreationTime = image.TimeOfSecondaryCapture = TM(when.time())
    for equipment in image.get("ContributingEquipmentSequence", []):
        purposes = [code.get("CodeValue") for code in equipment.get("PurposeOfReferenceCodeSequence", [])]
        if "ContributionDateTime" in equipment and ACQUISITION.value not in purposes:  # the source's own time stays
            equipment.ContributionDateTime = DT(when)
    return image


def _check(source: pydicom.Dataset, result: Result, display: np.ndarray, manifest: Manifest) -> Heatmap:
    if result.outcome is not Outcome.SCORED or result.heatmap is None:
        raise ReportError("Only a scored result with a heatmap has an overlay.")
    check_source(source, result, manifest, "an overlay", needs=("Rows", "Columns"))
    grid = result.heatmap
    if grid.width < 1 or grid.height < 1 or len(grid.values) != grid.width * grid.height:
        raise ReportError("The heatmap's values are not its width x height grid.")
    x0, y0, x1, y1 = grid.extent
    if not (x1 > x0 and y1 > y0):
        raise ReportError("The heatmap's extent is empty.")
    if display.dtype != np.uint8 or display.ndim not in (2, 3) or min(display.shape[:2]) < 1:
        raise ReportError("The display frame is not an 8-bit image.")
    if int(source.Rows) < 1 or int(source.Columns) < 1:
        raise ReportError("The source's Rows or Columns is zero.")
    return result.heatmap


def _reference(sop_class: str, sop_instance: str, purpose: Code) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    code = pydicom.Dataset()
    code.CodeValue = purpose.value
    code.CodingSchemeDesignator = purpose.scheme_designator
    code.CodeMeaning = purpose.meaning
    item.PurposeOfReferenceCodeSequence = [code]
    return item


def _orientation(source: pydicom.Dataset, frame_index: int) -> tuple[str, str] | None:
    """Patient Orientation of the frame (the direction of its rows, then of its columns) as single letters: the
    source's own where it gives two, else the nearest patient axes of its Image Orientation (Patient); None where
    it says neither."""
    given = source.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(str(v) in "LRPAHF" and len(str(v)) == 1 for v in given):
        return str(given[0]), str(given[1])
    cosines = _image_orientation(source, frame_index)
    if cosines is None:
        return None
    letters = []
    for vector in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_AXES[axis][0 if vector[axis] > 0 else 1])
    return letters[0], letters[1]


def _image_orientation(source: pydicom.Dataset, frame_index: int) -> np.ndarray | None:
    """Image Orientation (Patient): the top level's, else an enhanced object's frame's or shared group's."""
    candidates = [source]
    for keyword, index in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        groups = source.get(keyword)
        if groups and index < len(groups):
            candidates += [item for item in groups[index].get("PlaneOrientationSequence", [])]
    for dataset in candidates:
        value = dataset.get("ImageOrientationPatient")
        if value is None:
            continue
        try:
            cosines = np.asarray([float(v) for v in value], dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if cosines.shape == (6,) and np.all(np.isfinite(cosines)) and np.any(cosines[:3]) and np.any(cosines[3:]):
            return cosines
    return None
