"""Each compressed frame's own header, read before it is decoded: its sizes must be the DICOM header's.

A decoder sizes its output from the codestream (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ), not from Rows and
Columns: a few kilobytes claiming 30000 x 30000 pixels under a 64 x 64 header made libjpeg, then Pillow,
allocate gigabytes before failing. The DICOM header is what the limits were checked against, so a frame
whose codestream says otherwise is refused (codestream_mismatch) before any decoder sees it.

The JPEG markers are walked here rather than with pydicom's ``_get_jpg_parameters``: that one takes any two
bytes where a segment should start as a marker, while libjpeg skips such bytes to the next 0xFF, so the two can
reach different SOF segments (a small decoy for the check, the real one for the decoder). This walk refuses a
stream that is not marker-aligned, so it reads the SOF libjpeg reads. pydicom's ``get_j2k_parameters`` gives
no image size; the SIZ segment's fixed layout (ISO/IEC 15444-1 A.5.1) is read here too.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from pydicom import encaps, uid
from pydicom.dataset import Dataset

from appliance.domain.errors import CodestreamMismatch, CorruptDicom

_JP2_SIGNATURE = b"\x00\x00\x00\x0c\x6a\x50\x20\x20"
# SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC), which share the range; F7 is JPEG-LS's SOF55.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# Markers without a length: TEM and RST0..RST7 (SOI is the stream's first two bytes, EOI ends it).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS, _EOI = 0xDA, 0xD9


@dataclass(frozen=True)
class Sizes:
    """What a frame holds: rows x columns, samples (components) per pixel, and bits per sample."""

    rows: int
    columns: int
    samples: int
    bits: int


class _Unreadable(ValueError):
    """The frame's header cannot be read: not a stream of this kind, or cut short."""


def check_frames(ds: Dataset, frames: int) -> None:
    """Compare each of the first ``frames`` compressed frames' own header with the DICOM header.

    Raises CodestreamMismatch where a frame's size, components or precision differ from Rows, Columns,
    Samples per Pixel or Bits Allocated, and CorruptDicom where its header cannot be read. Native (not
    encapsulated) pixel data, and syntaxes without sizes in their stream, pass unchecked.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if "PixelData" not in ds or syntax is None or not syntax.is_encapsulated:
        return
    reader = _READERS.get(syntax)
    if reader is None:
        return  # no installed decoder either (checked before): refused as an unsupported syntax
    label, read = reader
    declared = Sizes(
        int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    )
    offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if "ExtendedOffsetTable" in ds else None
    stream = encaps.generate_frames(ds.PixelData, number_of_frames=frames, extended_offsets=offsets)
    for index, frame in enumerate(itertools.islice(stream, frames), start=1):
        try:
            found = read(frame, declared)
        except (_Unreadable, struct.error, IndexError) as e:
            raise CorruptDicom(f"Frame {index}'s {label} header could not be read.") from e
        if found != declared:
            raise CodestreamMismatch(
                f"Frame {index}'s {label} gives {_sizes(found)}; the DICOM header gives {_sizes(declared)} allocated."
            )


def _sizes(sizes: Sizes) -> str:
    samples = "1 sample" if sizes.samples == 1 else f"{sizes.samples} samples"
    return f"{sizes.columns} x {sizes.rows} pixels, {samples} per pixel, {sizes.bits} bits"


def jpeg_sizes(frame: bytes, declared: Sizes) -> Sizes:
    """A JPEG or JPEG-LS frame's SOF: its precision may be below Bits Allocated (8-bit lossy JPEG of 12-bit
    data, a 12-bit stream in 16-bit words), never above."""
    rows, columns, samples, bits = _jpeg_sof(frame)
    return Sizes(rows, columns, samples, declared.bits if bits <= declared.bits else bits)


def _jpeg_sof(frame: bytes) -> tuple[int, int, int, int]:
    """The first SOF segment's rows, columns, components and precision, walking the segments from SOI."""
    if frame[:2] != b"\xff\xd8":
        raise _Unreadable("no SOI")
    at = 2
    while True:
        if frame[at] != 0xFF:
            raise _Unreadable("a segment does not start with a marker")
        while frame[at] == 0xFF:  # fill bytes before a marker are allowed (ISO/IEC 10918-1 B.1.1.2)
            at += 1
        marker = frame[at]
        at += 1
        if marker in _STANDALONE:
            continue
        if marker in (_SOS, _EOI):
            raise _Unreadable("no SOF before the scan")
        (length,) = struct.unpack_from(">H", frame, at)
        if marker in _SOF:
            bits, rows, columns, samples = struct.unpack_from(">BHHB", frame, at + 2)
            return rows, columns, samples, bits
        if length < 2:
            raise _Unreadable("a segment shorter than its length field")
        at += length


def j2k_sizes(frame: bytes, declared: Sizes) -> Sizes:
    """A JPEG 2000 frame's SIZ: the image area on the reference grid, its components and their largest
    precision (at most Bits Allocated, as for JPEG)."""
    at = _j2k_codestream_start(frame)
    if frame[at : at + 4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ, which must come second (A.5.1)
        raise _Unreadable("no SOC and SIZ")
    x, y, x0, y0 = struct.unpack_from(">IIII", frame, at + 8)
    (components,) = struct.unpack_from(">H", frame, at + 40)
    if components == 0 or x <= x0 or y <= y0:
        raise _Unreadable("an empty image")
    ssiz = struct.unpack_from(f">{'Bxx' * components}", frame, at + 42)
    bits = max((s & 0x7F) + 1 for s in ssiz)
    return Sizes(y - y0, x - x0, components, declared.bits if bits <= declared.bits else bits)


def _j2k_codestream_start(frame: bytes) -> int:
    """Where the codestream starts: 0, or inside the jp2c box of a frame wrapped in JP2 boxes."""
    if not frame.startswith(_JP2_SIGNATURE):
        return 0
    at = 12
    while at + 8 <= len(frame):
        length = int.from_bytes(frame[at : at + 4], "big")
        if frame[at + 4 : at + 8] == b"jp2c":
            return at + 8
        if length < 8:  # 0 (to the end) or 1 (a 64-bit length) before the codestream: not a frame we read
            raise _Unreadable("a JP2 box without a usable length before the codestream")
        at += length
    raise _Unreadable("no jp2c box")


def rle_sizes(frame: bytes, declared: Sizes) -> Sizes:
    """An RLE frame has no image size in its header, only its segment count: one per byte of each sample
    (PS3.5 G.2). Any other count is reported as the samples and bits it would stand for."""
    if len(frame) < 64:
        raise _Unreadable("a header shorter than 64 bytes")
    (segments,) = struct.unpack_from("<I", frame)
    per_sample = max(1, -(-declared.bits // 8))
    if segments == declared.samples * per_sample:
        return declared
    if segments % per_sample == 0:
        return Sizes(declared.rows, declared.columns, segments // per_sample, declared.bits)
    return Sizes(declared.rows, declared.columns, declared.samples, 8 * segments // max(1, declared.samples))


_READERS = {
    **{syntax: ("JPEG codestream", jpeg_sizes) for syntax in uid.JPEGTransferSyntaxes},
    **{syntax: ("JPEG-LS codestream", jpeg_sizes) for syntax in uid.JPEGLSTransferSyntaxes},
    **{syntax: ("JPEG 2000 codestream", j2k_sizes) for syntax in uid.JPEG2000TransferSyntaxes},
    uid.RLELossless: ("RLE header", rle_sizes),
}
