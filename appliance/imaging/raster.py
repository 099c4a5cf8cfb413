"""Reads PNG, JPEG and TIFF (8 or 16 bit, gray or colour) with OpenCV, refusing decompression bombs first."""

from __future__ import annotations

import struct

import cv2
import numpy as np

from appliance.errors import CorruptImage, ImageTooLarge, UnsupportedPixelFormat
from appliance.imaging.types import DecodedImage, DecodeLimits, ImageMeta
from appliance.manifest import Preprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
# JPEG start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC), which carry the image size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def sniff(data: bytes) -> str | None:
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[:4] in TIFF_MAGICS:
        return "tiff"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF and i + 9 <= len(data):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """Width and length from the first IFD (tags 256, 257)."""
    endian = "<" if data[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack(endian + "I", data[4:8])
        (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
        size: dict[int, int] = {}
        for n in range(count):
            entry = data[offset + 2 + 12 * n : offset + 14 + 12 * n]
            tag, kind = struct.unpack(endian + "HH", entry[:4])
            if tag in (256, 257):
                fmt = "H" if kind == 3 else "I"
                size[tag] = struct.unpack(endian + fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
        return (size[256], size[257]) if len(size) == 2 else None
    except (struct.error, KeyError):
        return None


def header_size(kind: str, data: bytes) -> tuple[int, int] | None:
    reader = {"png": _png_size, "jpeg": _jpeg_size, "tiff": _tiff_size}[kind]
    return reader(data)


def _to_display(img: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    if img.dtype == np.uint8:
        top = 255.0
    elif img.dtype == np.uint16:
        top = 65535.0
    else:
        raise UnsupportedPixelFormat(f"{img.dtype} images are not supported; 8 or 16-bit integers are.")
    if preprocess.raster_window == "min_max":
        lo, hi = float(img.min()), float(img.max())
        if hi <= lo:
            return np.zeros(img.shape, dtype=np.float32)
        return ((img.astype(np.float32) - lo) / (hi - lo)).astype(np.float32)
    return img.astype(np.float32) * np.float32(1.0 / top)


def read_raster(data: bytes, kind: str, *, limits: DecodeLimits, preprocess: Preprocess) -> DecodedImage:
    size = header_size(kind, data)
    if size is None:
        raise CorruptImage(f"The {kind.upper()} header is corrupt or truncated.")
    width, height = size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"The {kind.upper()} header gives an empty image ({width}x{height}).")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,} "
            "(limits.max_pixels)."
        )
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise CorruptImage(f"The {kind.upper()} data is corrupt or truncated and could not be decoded.")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        elif img.shape[2] == 1:
            img = img[:, :, 0]
        else:
            raise UnsupportedPixelFormat(f"Images with {img.shape[2]} channels are not supported.")
    frame = _to_display(img, preprocess)
    return DecodedImage(frames=(frame,), meta=ImageMeta(source_format=kind))
