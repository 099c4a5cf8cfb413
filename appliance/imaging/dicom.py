"""Reads DICOM pixels the way a radiologist sees them: modality LUT, VOI LUT or window, MONOCHROME1 inverted."""

from __future__ import annotations

import copy
import io
import itertools
import logging
import math
import zlib
from typing import NamedTuple

import cv2
import numpy as np
import pydicom
import pydicom.pixels as px
from pydicom import encaps, filereader, uid
from pydicom.dataset import Dataset, FileDataset
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import BaseTag

from appliance.domain.errors import (
    CorruptDicom,
    ExcessPixelData,
    ImageTooLarge,
    InflatesTooLarge,
    InputRejected,
    MultiFrameRejected,
    NoPixelData,
    UnsupportedPixelFormat,
    UnsupportedTransferSyntax,
)
from appliance.domain.manifest import Preprocess
from appliance.domain.result import ImageIds
from appliance.imaging.codestream import check_frames
from appliance.imaging.types import DecodedImage, DecodeLimits, ImageMeta, ShrinkTo
from appliance.privacy import header_value

log = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# What a Deflated data set may inflate to beyond the pixel data its header declares: the header itself
# (an enhanced multi-frame object's per-frame groups run to megabytes) and any elements after the pixels.
HEADER_ALLOWANCE = 16 << 20
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
# Values far outside any stored range: pydicom's windowing sends them to the two ends of its output range,
# whose position depends on Bits Stored, Pixel Representation and the rescale. Measuring the ends this way
# maps the window's edges to exactly 0 and 1 without re-implementing pydicom's formula.
_PROBE = np.array([-1e12, 1e12])
# All frames of one input together may hold this many times the per-frame limit: decoded frames are
# kept (as float32) until the input is preprocessed.
TOTAL_PIXELS_FACTOR = 4
# pydicom's LUT functions work in float64 and make several temporaries; running them over bands of rows
# of about this many pixels keeps those temporaries small whatever the image size.
_BAND_PIXELS = 1 << 18
# What pydicom's modality and VOI functions read. Enhanced (multi-frame) objects keep the rescale and the
# window in functional groups instead of the top level; they are copied into a small per-frame view.
_LUT_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
_GROUP_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


class _Span(NamedTuple):
    """What the VOI maps to display black (lo) and white (hi); lut: a VOI LUT table, not a window."""

    lo: float
    hi: float
    lut: bool


def parse(data: bytes, *, force: bool = False, limits: DecodeLimits | None = None) -> Dataset:
    """Bytes -> dataset whose file meta names its transfer syntax; CorruptDicom if pydicom cannot read it.
    A Deflated data set is inflated here, within bounds set by its header and `limits` (InflatesTooLarge)."""
    try:
        ds = _inflated(data, force, limits or DecodeLimits())
        if ds is None:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        if "TransferSyntaxUID" not in ds.file_meta:
            # No file meta (old archives): the syntax is the encoding pydicom found while reading.
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                uid.ImplicitVRLittleEndian
                if implicit
                else (uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
            )
    except (InputRejected, MemoryError):
        raise
    except Exception as e:  # pydicom raises many types for malformed files; all of them mean "unreadable"
        raise CorruptDicom(
            f"The DICOM file is corrupt or truncated and could not be parsed ({type(e).__name__})."
        ) from e
    return ds


def _inflated(data: bytes, force: bool, limits: DecodeLimits) -> Dataset | None:
    """A Deflated Explicit VR Little Endian file, read with its inflation bounded; None for any other syntax.

    pydicom inflates such a data set whole, unbounded, before anything of it is known: a megabyte of
    deflated zeros became gigabytes. Here the first HEADER_ALLOWANCE bytes are inflated, the header in
    them is checked against the limits, and the rest may inflate to what that header declares, no more.
    """
    fp = io.BytesIO(data)
    preamble = filereader.read_preamble(fp, force)
    # pydicom's own reader of the file meta: the syntax seen here is the one dcmread would act on.
    meta = filereader._read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != uid.DeflatedExplicitVRLittleEndian:
        return None
    allowed = limits.max_file_bytes + HEADER_ALLOWANCE
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks = [inflater.decompress(memoryview(data)[fp.tell() :], min(HEADER_ALLOWANCE, allowed) + 1)]
    header, pixels_at = _header_of(chunks[0])
    if pixels_at is not None:
        _check_limits(header, limits)  # image_too_large before a byte more is inflated
        allowed = min(allowed, pixels_at + _declared_bytes(header) + HEADER_ALLOWANCE)
    elif not inflater.eof:
        raise InflatesTooLarge(
            f"The Deflated DICOM header inflates past {HEADER_ALLOWANCE >> 20} MiB without reaching its pixel data; "
            "it is refused as a decompression bomb."
        )
    size = len(chunks[0])
    while size <= allowed and (chunk := inflater.decompress(inflater.unconsumed_tail, allowed - size + 1)):
        chunks.append(chunk)
        size += len(chunk)
    if size > allowed:
        raise InflatesTooLarge(
            f"The Deflated DICOM data set inflates past {allowed:,} bytes, more than its header declares "
            "(or limits.max_file_mb allows); it is refused as a decompression bomb."
        )
    if not inflater.eof:
        raise CorruptDicom("The Deflated DICOM data set is truncated: its deflate stream ends early.")
    inflated = b"".join(chunks)
    del chunks
    dataset = filereader.read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    ds = FileDataset(io.BytesIO(), dataset, preamble, meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True)
    return ds


def _header_of(head: bytes) -> tuple[Dataset, int | None]:
    """The elements before the pixel data in the first inflated bytes, and where the pixel data starts
    (None if it is not in them)."""

    def at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag in _PIXEL_TAGS

    fp = io.BytesIO(head)
    header = filereader.read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=at_pixels)
    # read_dataset steps back to the element it stopped at; without one it reads to the end
    return header, (fp.tell() if fp.tell() < len(head) else None)


def _declared_bytes(ds: Dataset) -> int:
    """Rows x Columns x Samples x Frames x Bits Allocated / 8 of a header; 0 if it does not say."""
    try:
        values = [int(ds.get(k) or 1) for k in ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames")]
        bits = int(ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError):
        return 0
    count = math.prod(values)
    return max(0, count * bits // 8 + 8)


def read_dicom(
    data: bytes,
    *,
    limits: DecodeLimits,
    preprocess: Preprocess,
    shrink: ShrinkTo | None = None,
    display: ShrinkTo | None = None,
) -> DecodedImage:
    """A DICOM Part 10 file -> display-ready frames. Raises an InputRejected subclass for a bad file."""
    ds = parse(data, limits=limits)
    return decode_dataset(ds, limits=limits, preprocess=preprocess, shrink=shrink, display=display)


def decode_dataset(
    ds: Dataset,
    *,
    limits: DecodeLimits,
    preprocess: Preprocess,
    shrink: ShrinkTo | None = None,
    display: ShrinkTo | None = None,
) -> DecodedImage:
    """A parsed dataset -> display-ready frames; any failure of the pixel pipeline is this file's CorruptDicom.
    With `display`, also each frame as shown at the size it gives (DecodedImage.display_frames)."""
    try:
        return _decode(ds, limits, preprocess, shrink, display)
    except InputRejected as e:
        raise _naming(e, ds) from e.__cause__
    except MemoryError:
        raise
    except Exception as e:  # truncated fragments, bad JPEG streams, malformed LUTs: the file's fault
        raise _naming(_undecodable(ds, e), ds) from e
    except BaseException as e:
        # The Rust decoders (pylibjpeg-rle) panic on some corrupt data, and pyo3 raises that as
        # PanicException, which derives from BaseException so that `except Exception` misses it.
        if type(e).__name__ != "PanicException":
            raise
        raise _naming(_undecodable(ds, e), ds) from e


def _naming(error: InputRejected, ds: Dataset) -> InputRejected:
    """The rejection, with the identifiers the header gave: its result names the study, series and instance
    (GetResult finds it by its SOP Instance UID; a series is told of every image it lost)."""
    if error.ids is None:
        meta = _meta(ds)
        error.ids = ImageIds(
            meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid, meta.accession_number
        )
    return error


def _undecodable(ds: Dataset, error: BaseException) -> CorruptDicom:
    syntax = _syntax_label(ds.file_meta.get("TransferSyntaxUID")) if hasattr(ds, "file_meta") else "unknown syntax"
    return CorruptDicom(f"The DICOM pixel data could not be decoded ({syntax}: {type(error).__name__}).")


def _syntax_label(syntax: uid.UID | None) -> str:
    """A transfer syntax as a message may show it: pydicom's name for a standard one, else a valid UID."""
    if not syntax:
        return "unknown syntax"
    if syntax.name != str(syntax):
        return f"{syntax.name} ({syntax})"
    return f"{header_value('TransferSyntaxUID', syntax)} (not a standard one)"


def _syntax_name(ds: Dataset) -> str:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return str(syntax.name) if syntax else ""


def _meta(ds: Dataset) -> ImageMeta:
    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return str(value).strip() if value is not None else ""

    return ImageMeta(
        source_format="dicom",
        study_instance_uid=text("StudyInstanceUID"),
        series_instance_uid=text("SeriesInstanceUID"),
        sop_instance_uid=text("SOPInstanceUID"),
        accession_number=text("AccessionNumber"),
        modality=text("Modality"),
        transfer_syntax=_syntax_name(ds),
        photometric=text("PhotometricInterpretation"),
        rows=_size(ds, "Rows"),
        columns=_size(ds, "Columns"),
        images_in_acquisition=_size(ds, "ImagesInAcquisition"),
    )


def _size(ds: Dataset, keyword: str) -> int:
    """A count as the header gives it (Rows, Columns, Images in Acquisition); 0 where it is missing or unreadable
    (decoding refuses those without Rows or Columns)."""
    try:
        return max(0, int(ds.get(keyword) or 0))
    except (TypeError, ValueError):
        return 0


def _check_pixels_present(ds: Dataset) -> None:
    if any(k in ds for k in _PIXEL_KEYWORDS):
        return
    if len(ds) == 0:
        # pydicom returns an empty dataset when the file ends inside an element of undefined length,
        # which is how a cut-off compressed image usually looks.
        raise CorruptDicom("The DICOM file is truncated: nothing after its file meta header could be read.")
    sop_class = uid.UID(str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")))
    if ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_class.name:
        # Image attributes but no pixels: an image object whose end was cut off, not a report.
        raise CorruptDicom("The DICOM file is truncated: it describes an image but its Pixel Data is missing.")
    if ds.get("Modality"):
        kind = header_value("Modality", ds.Modality)
    elif sop_class:
        kind = sop_class.name if sop_class.name != str(sop_class) else header_value("SOPClassUID", sop_class)
    else:
        kind = "this object"
    raise NoPixelData(f"The DICOM object ({kind}) holds no image (no Pixel Data), e.g. a report or RT plan.")


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
    if frames > limits.max_frames:
        raise ImageTooLarge(f"The input has {frames} frames; the limit is {limits.max_frames} (limits.max_frames).")
    # Count decoded values, not pixels: colour (and palette colour, once expanded) holds three per pixel.
    samples = (
        3
        if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR"
        else int(ds.get("SamplesPerPixel", 1) or 1)
    )
    if rows * cols * frames * samples > limits.max_pixels * TOTAL_PIXELS_FACTOR:
        raise ImageTooLarge(
            f"The input holds {frames} frames of {cols}x{rows}x{samples}, {rows * cols * frames * samples:,} values "
            f"in all; the limit is {limits.max_pixels * TOTAL_PIXELS_FACTOR:,} ({TOTAL_PIXELS_FACTOR} x "
            "limits.max_pixels)."
        )
    if frames > 1 and limits.multiframe == "reject":
        raise MultiFrameRejected(f"The input has {frames} frames (limits.multiframe = 'reject').")
    return frames


def _check_decoder(ds: Dataset) -> None:
    if "PixelData" not in ds:
        return  # float pixel data is never compressed
    syntax = ds.file_meta.TransferSyntaxUID
    label = _syntax_label(syntax)
    try:
        decoder = px.get_decoder(syntax)
    except NotImplementedError as e:
        raise UnsupportedTransferSyntax(f"No installed decoder handles the transfer syntax {label}.") from e
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(
            f"The decoder for the transfer syntax {label} is not installed; it needs one of: "
            f"{'; '.join(decoder.missing_dependencies)}."
        )


def _check_pixel_length(ds: Dataset, frames: int) -> None:
    """Native pixel data must hold what the header declares (Rows x Columns x Samples x Frames x Bits
    Allocated) and not a whole frame more: pydicom would read extra frames, or guess at another layout."""
    if "PixelData" not in ds:
        return
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax == uid.RLELossless:
        # One fragment per frame (PS3.5 A.4.2); other encapsulated syntaxes may split a frame over several
        # fragments, and they are decoded one frame at a time, never more than Number of Frames.
        fp = io.BytesIO(ds.PixelData)
        encaps.parse_basic_offsets(fp)
        fragments, _ = encaps.parse_fragments(fp)
        if fragments > frames:
            raise ExcessPixelData(
                f"The RLE Pixel Data holds {fragments:,} fragments, one per frame, but its header declares "
                f"{frames:,} frames."
            )
    if syntax.is_encapsulated:
        return
    expected = int(get_expected_length(ds, unit="bytes"))
    actual = len(ds.PixelData)
    if actual < expected:
        raise CorruptDicom(
            f"The DICOM Pixel Data holds {actual:,} bytes, fewer than the {expected:,} its header declares; "
            "the file is truncated or inconsistent."
        )
    frame_bytes = max(1, expected // frames)
    if actual - expected >= frame_bytes:
        raise ExcessPixelData(
            f"The DICOM Pixel Data holds {actual:,} bytes, {(actual - expected) // frame_bytes:,} frames more than "
            f"the {frames:,} ({expected:,} bytes) its header declares."
        )


_JP2_SIGNATURE = b"\x00\x00\x00\x0c\x6a\x50\x20\x20"


def _check_jp2_boxes(ds: Dataset) -> None:
    """JPEG 2000 frames wrapped in JP2 boxes: pydicom walks the boxes to the codestream before decoding and
    loops for good on a box whose length is below its own 8-byte header. Walk them first, bounded."""
    if ds.file_meta.get("TransferSyntaxUID") not in uid.JPEG2000TransferSyntaxes:
        return
    try:
        fragments = encaps.generate_fragments(ds.PixelData)
        for fragment in fragments:
            if not fragment.startswith(_JP2_SIGNATURE):
                continue
            offset = 12
            while offset < len(fragment):
                length = int.from_bytes(fragment[offset : offset + 4], "big")
                if fragment[offset + 4 : offset + 8] == b"jp2c":
                    break
                if length < 8:
                    raise CorruptDicom(
                        "A JPEG 2000 frame's JP2 box structure is corrupt (a box shorter than its header)."
                    )
                offset += length
    except (ValueError, KeyError, AttributeError) as e:
        raise CorruptDicom("The encapsulated JPEG 2000 pixel data is corrupt.") from e


def _decode(
    ds: Dataset, limits: DecodeLimits, preprocess: Preprocess, shrink: ShrinkTo | None, display: ShrinkTo | None
) -> DecodedImage:
    _check_pixels_present(ds)
    meta = _meta(ds)
    frames = _check_limits(ds, limits)
    _check_decoder(ds)
    _check_pixel_length(ds, frames)
    _check_jp2_boxes(ds)
    check_frames(ds, frames)  # a codestream that claims other sizes never reaches a decoder
    photometric = meta.photometric.upper()
    if photometric not in _GRAY + _COLOR:
        label = header_value("PhotometricInterpretation", photometric)
        raise UnsupportedPixelFormat(f"Photometric interpretation {label} is not supported.")
    gray = photometric in _GRAY
    top = 1.0 if gray else _color_top(ds, photometric)
    voi = gray and preprocess.dicom_window == "voi"
    top_level_span = _voi_span(ds) if voi else None  # measured once, not per frame
    out: list[np.ndarray] = []
    shown_frames: list[np.ndarray] = []  # asked for with `display`
    # One frame at a time: a long multi-frame series never sits decoded in its stored form all at once.
    # Gray frames come as read-only views on the pixel bytes where pydicom can (native syntaxes): the
    # steps below never write into their input. Colour keeps pydicom's own handling.
    # Never past Number of Frames: pydicom would go on to whatever more the pixel data holds.
    pixels = (
        px.iter_pixels(ds, as_rgb=True, correct_unused_bits=False, view_only=True, allow_excess_frames=False)
        if gray
        else px.iter_pixels(ds, as_rgb=True, allow_excess_frames=False)
    )
    for index, frame in enumerate(itertools.islice(pixels, frames)):
        if gray:
            frame = _clear_unused_bits(frame, ds)
            view = _lut_view(ds, index)
            span = top_level_span if view is ds or not voi else _voi_span(view)
            stored = frame
            if span is not None:
                # Only under a window or VOI LUT: without one the display range is the frame's own
                # minimum and maximum, which averaging would move (a single hot pixel would vanish).
                frame = _shrink_stored(stored, shrink)
            out.append(_shown(frame, view, span, photometric))
            if display is not None:
                # The same stored frame shrunk to the display size instead: one decode for both.
                again = span is not None and frame is not stored
                shown = (
                    _shown(_shrink_stored(stored, display, blocks=True), view, span, photometric) if again else out[-1]
                )
                shown_frames.append(shown)
        else:
            out.append(_color(frame, ds, photometric, top))
            if display is not None:
                shown_frames.append(out[-1])
    if len(out) != frames:
        raise CorruptDicom(f"The header announces {frames} frames but {len(out)} could be decoded.")
    return DecodedImage(frames=tuple(out), meta=meta, original_frame_count=frames, display_frames=tuple(shown_frames))


def _shown(frame: np.ndarray, view: Dataset, span: _Span | None, photometric: str) -> np.ndarray:
    shown = _gray(frame, view, span)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, shown, out=shown)  # high stored values are dark; look like MONOCHROME2
    return shown


def _lut_view(ds: Dataset, index: int) -> Dataset:
    """The dataset pydicom's LUT functions should see for frame `index`: the top level, overlaid with the
    shared and then this frame's functional groups (rescale, window) of an enhanced object."""
    groups: list[Dataset] = []
    shared, per_frame = ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    items = [group[keyword][0] for group in groups for keyword in _GROUP_SEQUENCES if group.get(keyword)]
    if not items:
        return ds
    view = Dataset()
    view.file_meta = ds.file_meta  # pydicom reads the byte order of OW LUT data from it
    # Shallow copies: pydicom's windowing writes converted values back into the dataset it is given.
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            view[keyword] = copy.copy(ds[keyword])
    for item in items:
        for keyword in _LUT_KEYWORDS:
            if keyword in item:
                view[keyword] = copy.copy(item[keyword])
    return view


def _has_voi_lut(ds: Dataset) -> bool:
    # The same test pydicom's apply_voi_lut makes before it uses the table.
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _voi_span(ds: Dataset) -> _Span | None:
    """Where the first VOI LUT or window puts display black and white, or None if the file has none usable."""
    try:
        if _has_voi_lut(ds):
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
            # A table's output range is its own lowest and highest entry, whichever way it runs.
            table = px.apply_voi_lut(np.arange(first, first + entries), ds, index=0, prefer_lut=True)
            span = _Span(float(table.min()), float(table.max()), lut=True)
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            # A window's lower edge is black and its upper edge white, even if a negative rescale slope
            # makes pydicom's output run downwards.
            with np.errstate(over="ignore"):  # as in _gray
                ends = px.apply_voi_lut(_PROBE.copy(), ds, index=0, prefer_lut=True)
            span = _Span(float(ends[0]), float(ends[-1]), lut=False)
        else:
            return None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError) as e:
        # A malformed window is common in the wild; the image is still readable without it.
        log.warning("ignoring an unusable VOI LUT or window (%s); using the image's own range", type(e).__name__)
        return None
    if not (math.isfinite(span.lo) and math.isfinite(span.hi)):
        log.warning("ignoring a window that is not a finite number; using the image's own range")
        return None
    return span if span.hi != span.lo else None


# cv2.resize's INTER_AREA takes these stored types as they are; others (32-bit) are rare and left whole.
_SHRINKABLE = (np.uint8, np.uint16, np.int16)


def _shrink_stored(frame: np.ndarray, shrink: ShrinkTo | None, *, blocks: bool = False) -> np.ndarray:
    """Shrink the stored integers first, so the LUTs and the float conversion run on the small image.

    Area averaging commutes with the rescale and with a window's linear part; it differs from shrinking
    the displayed image only where a window clips, or a LUT table (modality or VOI) or a sigmoid bends,
    within one averaged block, and by the rounding of each mean to an integer (half a stored unit a step).
    `make bench` measures the difference on full-size radiographs. Never a full-resolution float copy.

    A frame at least four times the target on both axes is first halved by exact 2x2 means, OpenCV's
    integer-factor INTER_AREA path: about 4x cheaper in all than one fractional INTER_AREA over 5 Mpixel.
    For that an odd last row or column is dropped (half a stored pixel of shift). Measured against one
    fractional step: the mean difference grows from 0.0003 to 0.0015 display units, the max stays; more
    halvings save little more time and widen the averaging kernel (mean 0.004 at 8x).
    """
    if shrink is None or frame.ndim != 2 or frame.dtype.type not in _SHRINKABLE:
        return frame
    target = shrink(frame.shape[0], frame.shape[1])
    if target is None:
        return frame
    rows, cols = target
    k = frame.shape[0] // rows
    if blocks and k >= 2 and frame.shape[1] // cols == k:
        # A picture's frame (the display size an integer factor below the stored one): exact k x k means, the
        # last rows and columns short of a block dropped (under a display pixel), 4x cheaper than fractional.
        return cv2.resize(frame[: rows * k, : cols * k], (cols, rows), interpolation=cv2.INTER_AREA)
    if frame.shape[0] >= 4 * rows and frame.shape[1] >= 4 * cols:
        even = frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2]
        frame = cv2.resize(even, (even.shape[1] // 2, even.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(frame, (cols, rows), interpolation=cv2.INTER_AREA)


def _clear_unused_bits(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Values with only their Bits Stored significant (PS3.5 8.1.1), like pydicom's own correction, but
    without its copy and two full passes when the unused high bits are already clear, as they nearly
    always are: then the frame is returned as it is (possibly a read-only view on the file's bytes)."""
    if frame.dtype.kind not in "iu":
        return frame
    stored = int(ds.get("BitsStored", 0) or 0)
    allocated = frame.dtype.itemsize * 8
    if not 0 < stored < allocated:
        return frame
    lo, hi = (0, (1 << stored) - 1) if frame.dtype.kind == "u" else (-(1 << (stored - 1)), (1 << (stored - 1)) - 1)
    if frame.size == 0 or (lo <= int(frame.min()) and int(frame.max()) <= hi):
        return frame
    shift = allocated - stored
    out = np.left_shift(frame, shift)
    np.right_shift(out, shift, out=out)  # arithmetic for signed types: sign-extends from Bits Stored
    return out


def _gray(frame: np.ndarray, ds: Dataset, span: _Span | None) -> np.ndarray:
    """Stored values of one grayscale frame -> display units 0..1, as float32: through the modality LUT,
    then through the VOI if `span` is given, else stretched from its own minimum and maximum."""
    if frame.ndim != 2:
        raise UnsupportedPixelFormat(f"A grayscale frame has shape {frame.shape}; expected rows x columns.")
    shown = np.empty(frame.shape, dtype=np.float32)
    band = max(1, _BAND_PIXELS // max(1, frame.shape[1]))
    for top in range(0, frame.shape[0], band):
        values = px.apply_modality_lut(frame[top : top + band], ds)
        if span is not None:
            if span.lut and not np.issubdtype(values.dtype, np.integer):
                # A VOI LUT is indexed by integers; pydicom would truncate floats (and warn about it).
                values = np.rint(values).astype(np.int64)
            with np.errstate(over="ignore"):  # SIGMOID far from its centre: exp() overflows to the right end
                values = px.apply_voi_lut(values, ds, index=0, prefer_lut=True)
        shown[top : top + band] = values
    stored_float = not np.issubdtype(frame.dtype, np.integer)  # Float Pixel Data may hold NaN or inf
    if not stored_float and not (math.isfinite(shown.min()) and math.isfinite(shown.max())):
        # Integers made NaN or infinite by the modality LUT: a rescale of NaN, infinity or far out of range.
        raise CorruptDicom("The Rescale Slope or Intercept (modality LUT) turns the pixels into non-finite numbers.")
    if span is not None:
        lo, hi = span.lo, span.hi
    else:
        finite = shown[np.isfinite(shown)] if stored_float else shown
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if hi == lo:  # a blank frame has no range to stretch
        shown.fill(0.0)
        return shown
    shown -= np.float32(lo)
    shown /= np.float32(hi - lo)
    np.clip(shown, 0.0, 1.0, out=shown)
    if stored_float:
        np.nan_to_num(shown, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return shown


def _color_top(ds: Dataset, photometric: str) -> float:
    """The value that means full intensity in this file's colour frames."""
    if photometric == "PALETTE COLOR":
        # Palette entries are 16 bit wide in many files that hold 8-bit values; judge by the whole table
        # rather than by one image, which may simply be dark.
        bits = min(int(ds.BitsStored), 16)
        table = px.apply_color_lut(np.arange(2**bits, dtype=np.uint16 if bits > 8 else np.uint8), ds)
        return 255.0 if float(table.max()) <= 255 else 65535.0
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    return float(2**bits - 1)


def _color(frame: np.ndarray, ds: Dataset, photometric: str, top: float) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        frame = px.apply_color_lut(frame, ds)[..., :3]  # an alpha palette, if any, is dropped
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise UnsupportedPixelFormat(f"A colour frame has shape {frame.shape}; expected rows x columns x 3.")
    shown = np.multiply(frame, np.float32(1.0 / top), dtype=np.float32)
    return np.clip(shown, 0.0, 1.0, out=shown)
