"""Reads DICOM pixels the way a radiologist sees them: modality LUT, VOI LUT or window, MONOCHROME1 inverted."""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
import pydicom
import pydicom.pixels as px
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from appliance.errors import (
    CorruptDicom,
    ImageTooLarge,
    InputRejected,
    MultiFrameRejected,
    NoPixelData,
    UnsupportedPixelFormat,
    UnsupportedTransferSyntax,
)
from appliance.imaging.types import DecodedImage, DecodeLimits, ImageMeta
from appliance.manifest import Preprocess

log = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
# A probe far outside any stored value: pydicom's own VOI maps it to the ends of its output range,
# so the window's edges become exactly 0 and 1 without re-implementing the LUT.
_PROBE = np.array([-1e12, 1e12])
# All frames of one input together may hold this many times the per-frame limit: decoded frames are
# kept (as float32) until the input is preprocessed.
TOTAL_PIXELS_FACTOR = 4


def parse(data: bytes, *, force: bool = False) -> Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
        if "TransferSyntaxUID" not in ds.file_meta:
            # No file meta (old archives): the syntax is the encoding pydicom found while reading.
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                uid.ImplicitVRLittleEndian
                if implicit
                else (uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
            )
        return ds
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, struct.error) as e:
        raise CorruptDicom(
            f"The DICOM file is corrupt or truncated and could not be parsed ({type(e).__name__})."
        ) from e


def _meta(ds: Dataset) -> ImageMeta:
    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return str(value) if value is not None else ""

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return ImageMeta(
        source_format="dicom",
        study_instance_uid=text("StudyInstanceUID"),
        series_instance_uid=text("SeriesInstanceUID"),
        sop_instance_uid=text("SOPInstanceUID"),
        accession_number=text("AccessionNumber"),
        modality=text("Modality"),
        transfer_syntax=syntax.name if syntax else "",
        photometric=text("PhotometricInterpretation"),
    )


def _check_limits(ds: Dataset, limits: DecodeLimits) -> int:
    """Refuse absurd sizes from the header alone, before a byte of pixel data is decoded."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as e:
        raise CorruptDicom("The DICOM header lacks valid Rows, Columns or Number of Frames.") from e
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise CorruptDicom(f"The DICOM header gives an empty image ({rows}x{cols}, {frames} frames).")
    if rows * cols > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {cols}x{rows} = {rows * cols:,} pixels; the limit is {limits.max_pixels:,} "
            "(limits.max_pixels)."
        )
    if rows * cols * frames > limits.max_pixels * TOTAL_PIXELS_FACTOR:
        raise ImageTooLarge(
            f"The input holds {frames} frames of {cols}x{rows}, {rows * cols * frames:,} pixels in all; the limit "
            f"is {limits.max_pixels * TOTAL_PIXELS_FACTOR:,} ({TOTAL_PIXELS_FACTOR} x limits.max_pixels)."
        )
    if frames > limits.max_frames:
        raise ImageTooLarge(f"The input has {frames} frames; the limit is {limits.max_frames} (limits.max_frames).")
    if frames > 1 and limits.multiframe == "reject":
        raise MultiFrameRejected(f"The input has {frames} frames (limits.multiframe = 'reject').")
    return frames


def _check_decoder(ds: Dataset) -> None:
    if "PixelData" not in ds:
        return  # float pixel data is never compressed
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return  # pydicom assumes implicit little endian for a file without meta, as it parsed it
    try:
        decoder = px.get_decoder(syntax)
    except NotImplementedError as e:
        raise UnsupportedTransferSyntax(
            f"No installed decoder handles the transfer syntax {syntax.name or 'unknown'} ({syntax})."
        ) from e
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(
            f"The decoder for {syntax.name} ({syntax}) is not installed; {decoder.missing_dependencies}."
        )


def _window(frame: np.ndarray, ds: Dataset, preprocess: Preprocess) -> np.ndarray:
    """Stored values -> display units 0..1 for one grayscale frame."""
    values = px.apply_modality_lut(frame, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if preprocess.dicom_window == "voi" and has_voi:
        try:
            shown = px.apply_voi_lut(values, ds, index=0, prefer_lut=True)
            ends = px.apply_voi_lut(_PROBE.copy(), ds, index=0, prefer_lut=True)
            lo, hi = float(np.min(ends)), float(np.max(ends))
            if hi > lo:
                return np.clip((shown - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        except (ValueError, TypeError, IndexError) as e:
            # A malformed window is common in the wild; the image is still readable without it.
            log.warning("ignoring an unusable VOI/window (%s); using the image's own range", type(e).__name__)
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _color(frame: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        frame = px.apply_color_lut(frame, ds)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise UnsupportedPixelFormat(f"A {photometric} frame has shape {frame.shape}; expected rows x columns x 3.")
    top = float(np.iinfo(frame.dtype).max) if np.issubdtype(frame.dtype, np.integer) else max(float(frame.max()), 1.0)
    if photometric == "PALETTE COLOR" and np.issubdtype(frame.dtype, np.integer):
        top = float(frame.max()) if frame.max() > 255 else 255.0  # palette LUTs are 8 or 16 bit wide
    return (frame.astype(np.float32) / top).clip(0.0, 1.0)


def read_dicom(data: bytes, *, limits: DecodeLimits, preprocess: Preprocess, force: bool = False) -> DecodedImage:
    ds = parse(data, force=force)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        sop_class = uid.UID(str(ds.get("SOPClassUID", "")))
        if ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_class.name:
            # Image attributes but no pixels: the file was cut short, not a report.
            raise CorruptDicom("The DICOM file is truncated: it describes an image but its Pixel Data is missing.")
        kind = str(ds.get("Modality", "") or ds.get("SOPClassUID", "") or "this object")
        raise NoPixelData(f"The DICOM object ({kind}) holds no image (no Pixel Data), e.g. a report or RT plan.")
    meta = _meta(ds)
    frames = _check_limits(ds, limits)
    _check_decoder(ds)
    photometric = meta.photometric.strip().upper()
    if photometric not in _GRAY + _COLOR:
        raise UnsupportedPixelFormat(f"Photometric interpretation {photometric or '(missing)'} is not supported.")
    out: list[np.ndarray] = []
    try:
        # One frame at a time: a long multi-frame series never sits decoded in memory at once.
        for frame in px.iter_pixels(ds, as_rgb=True):
            if photometric in _GRAY:
                shown = _window(frame, ds, preprocess)
                out.append(1.0 - shown if photometric == "MONOCHROME1" else shown)
            else:
                out.append(_color(frame, ds, photometric))
    except InputRejected:
        raise
    except MemoryError:
        raise
    except Exception as e:  # every decoder failure (truncated fragments, bad JPEG data) is this file's fault
        raise CorruptDicom(
            f"The DICOM pixel data could not be decoded ({meta.transfer_syntax or 'unknown syntax'}: "
            f"{type(e).__name__})."
        ) from e
    if len(out) != frames:
        raise CorruptDicom(f"The header announces {frames} frames but {len(out)} could be decoded.")
    return DecodedImage(frames=tuple(out), meta=meta, original_frame_count=frames)
