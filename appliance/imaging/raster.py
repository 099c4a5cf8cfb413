"""Reads PNG, JPEG and TIFF (8 or 16 bit, gray or colour) with OpenCV, refusing decompression bombs first."""

from __future__ import annotations

import struct
from typing import NamedTuple

import cv2
import numpy as np

from appliance.domain.errors import CorruptImage, ImageTooLarge, InputRejected, UnsupportedPixelFormat
from appliance.domain.manifest import Preprocess
from appliance.imaging.types import DecodedImage, DecodeLimits, ImageMeta

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
# JPEG start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC), which carry the image size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# JPEG markers that stand alone, without a length: TEM, SOI, RST0..7.
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}


class Header(NamedTuple):
    """What the file's header claims, read without decoding. depth: bits per sample, 0 where unknown;
    gray: the file says it is grayscale (OpenCV hands gray-with-alpha back as BGRA)."""

    width: int
    height: int
    depth: int = 0
    gray: bool = False


def sniff(data: bytes) -> str | None:
    """'png', 'jpeg' or 'tiff' from the magic bytes, or None."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[:4] in TIFF_MAGICS:
        return "tiff"
    return None


def _png_header(data: bytes) -> Header | None:
    # IHDR is always the first chunk: width, height, bit depth, colour type (0 gray, 4 gray and alpha).
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return Header(int(width), int(height), int(depth), gray=colour in (0, 4))


def _jpeg_header(data: bytes) -> Header | None:
    """Walk the marker segments to the first start-of-frame, which holds precision, height and width."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            depth, height, width = struct.unpack(">BHH", data[i + 4 : i + 9])
            return Header(int(width), int(height), int(depth))
        i += 2 + length
    return None


def _tiff_header(data: bytes) -> Header | None:
    """Width, length and photometric interpretation from the first IFD (tags 256, 257, 262); OpenCV decodes
    the first page only."""
    endian = "<" if data[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack(endian + "I", data[4:8])
        (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
        tags: dict[int, int] = {}
        for n in range(count):
            entry = data[offset + 2 + 12 * n : offset + 14 + 12 * n]
            tag, kind = struct.unpack(endian + "HH", entry[:4])
            if tag in (256, 257, 262):
                fmt = "H" if kind == 3 else "I"  # SHORT or LONG
                tags[tag] = struct.unpack(endian + fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
    except struct.error:
        return None
    if 256 not in tags or 257 not in tags:
        return None
    return Header(tags[256], tags[257], gray=tags.get(262) in (0, 1))  # WhiteIsZero, BlackIsZero


def read_header(kind: str, data: bytes) -> Header | None:
    """The size the file claims, from its header alone; None if the header is missing or cut short."""
    reader = {"png": _png_header, "jpeg": _jpeg_header, "tiff": _tiff_header}[kind]
    return reader(data)


def read_raster(data: bytes, kind: str, *, limits: DecodeLimits, preprocess: Preprocess) -> DecodedImage:
    """A PNG, JPEG or TIFF file -> one display-ready frame. Raises an InputRejected subclass for a bad file."""
    try:
        return _read(data, kind, limits, preprocess)
    except (InputRejected, MemoryError):
        raise
    except Exception as e:  # cv2.error and friends: the file's fault
        if isinstance(e, cv2.error) and getattr(e, "code", None) == cv2.Error.StsNoMem:
            raise MemoryError from e  # the worker's memory cap, not a corrupt file
        raise CorruptImage(f"The {kind.upper()} data could not be decoded ({type(e).__name__}).") from e


def _read(data: bytes, kind: str, limits: DecodeLimits, preprocess: Preprocess) -> DecodedImage:
    header = read_header(kind, data)
    if header is None:
        raise CorruptImage(f"The {kind.upper()} header is corrupt or truncated.")
    width, height = header.width, header.height
    if width <= 0 or height <= 0:
        raise CorruptImage(f"The {kind.upper()} header gives an empty image ({width}x{height}).")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,} "
            "(limits.max_pixels)."
        )
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        if kind == "jpeg" and header.depth not in (0, 8):
            raise UnsupportedPixelFormat(f"{header.depth}-bit JPEG images are not supported; 8-bit ones are.")
        raise CorruptImage(f"The {kind.upper()} data is corrupt or truncated and could not be decoded.")
    if img.ndim == 3:
        channels = img.shape[2]
        if channels in (1, 2) or header.gray:
            img = img[:, :, 0]  # gray; gray and alpha; or gray that OpenCV spread over B, G, R (and alpha)
        elif channels == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)  # alpha is dropped: models see the colours
        elif channels == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        else:
            raise UnsupportedPixelFormat(f"Images with {channels} channels are not supported.")
    meta = ImageMeta(source_format=kind, rows=img.shape[0], columns=img.shape[1])
    return DecodedImage(frames=(_to_display(img, preprocess),), meta=meta)


def _to_display(img: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    if img.dtype == np.uint8:
        top = 255.0
    elif img.dtype == np.uint16:
        top = 65535.0
    else:
        raise UnsupportedPixelFormat(f"{img.dtype} images are not supported; 8 or 16-bit unsigned integers are.")
    lo = 0.0
    if preprocess.raster_window == "min_max":
        lo, top = float(img.min()), float(img.max())
        if top <= lo:  # a blank image has no range to stretch
            return np.zeros(img.shape, dtype=np.float32)
    shown = np.subtract(img, np.float32(lo), dtype=np.float32)
    shown /= np.float32(top - lo)  # a division, not a reciprocal multiply: 8-bit values come out exact
    return np.clip(shown, 0.0, 1.0, out=shown)
