"""PNG, JPEG and TIFF reading on images encoded here with OpenCV: exact values, channel order, header sizes."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from appliance.domain.errors import ImageTooLarge
from appliance.domain.manifest import Preprocess
from appliance.imaging.raster import read_header
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodeLimits

GRAY8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
GRAY16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0..65535


def _encode(ext: str, arr: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, arr, params or [])
    assert ok
    return buf.tobytes()


def _read(data: bytes, preprocess: Preprocess | None = None, limits: DecodeLimits | None = None) -> np.ndarray:
    image = decode(data, limits=limits or DecodeLimits(), preprocess=preprocess or Preprocess())
    assert len(image.frames) == 1 and image.original_frame_count == 1
    frame = image.frames[0]
    assert frame.dtype == np.float32 and frame.min() >= 0.0 and frame.max() <= 1.0
    return frame


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_8_bit_gray_maps_0_255_exactly_and_stays_2d(ext: str) -> None:
    out = _read(_encode(ext, GRAY8))
    assert out.shape == (16, 16)
    assert np.array_equal(out, GRAY8.astype(np.float32) / np.float32(255))
    assert out[0, 0] == 0.0 and out[-1, -1] == 1.0


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16_bit_gray_maps_0_65535_exactly(ext: str) -> None:
    out = _read(_encode(ext, GRAY16))
    assert out.shape == (16, 16)
    assert np.array_equal(out, GRAY16.astype(np.float32) / np.float32(65535))


def test_min_max_policy_stretches_each_image_own_range() -> None:
    narrow = (GRAY16 // 4 + 1000).astype(np.uint16)  # 1000..17383 of 65535
    out = _read(_encode(".png", narrow), Preprocess(raster_window="min_max"))
    lo, hi = float(narrow.min()), float(narrow.max())
    assert np.allclose(out, (narrow - lo) / (hi - lo), atol=1e-7)
    assert out.min() == 0.0 and out.max() == 1.0
    blank = _read(_encode(".png", np.full((8, 8), 77, np.uint8)), Preprocess(raster_window="min_max"))
    assert np.array_equal(blank, np.zeros((8, 8), np.float32))


def test_colour_comes_out_rgb() -> None:
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    bgr[..., 1] = 51
    out = _read(_encode(".png", bgr))
    assert out.shape == (8, 8, 3)
    assert np.array_equal(out[3, 3], np.array([255, 51, 0], np.float32) / np.float32(255))
    jpeg = _read(_encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 100]))
    assert np.allclose(jpeg[4, 4], [1.0, 0.2, 0.0], atol=0.02)


def test_16_bit_colour_png() -> None:
    bgr = np.zeros((4, 4, 3), np.uint16)
    bgr[..., 0] = 65535  # blue
    bgr[..., 2] = 4096
    out = _read(_encode(".png", bgr))
    assert np.array_equal(out[0, 0], np.array([4096, 0, 65535], np.float32) / np.float32(65535))


def test_alpha_is_dropped_and_colours_kept() -> None:
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 7
    out = _read(_encode(".png", bgra))
    assert out.shape == (8, 8, 3)
    assert np.array_equal(out[0, 0], np.array([30, 20, 10], np.float32) / np.float32(255))


def test_gray_with_alpha_png_stays_2d() -> None:
    # OpenCV cannot write gray+alpha, so the PNG is assembled here (colour type 4).
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rows = b"".join(b"\x00" + bytes(v for g in row for v in (int(g), 128)) for row in gray)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 3, 8, 4, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )
    out = _read(png)
    assert out.shape == (3, 4)
    assert np.array_equal(out, gray.astype(np.float32) / np.float32(255))


def test_gray_jpeg_is_close_and_2d() -> None:
    smooth = cv2.GaussianBlur(np.tile(GRAY8, (4, 4)), (0, 0), 2)
    out = _read(_encode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 95]))
    assert out.shape == smooth.shape
    assert np.abs(out - smooth / 255.0).mean() < 0.01


def test_raster_meta_names_the_format() -> None:
    for ext, kind in ((".png", "png"), (".jpg", "jpeg"), (".tiff", "tiff")):
        meta = decode(_encode(ext, GRAY8), limits=DecodeLimits(), preprocess=Preprocess()).meta
        assert meta.source_format == kind
        assert meta.transfer_syntax == meta.photometric == meta.sop_instance_uid == ""


@pytest.mark.parametrize(
    "ext, params",
    [
        (".png", []),
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".tiff", []),
    ],
    ids=["png", "jpeg", "progressive jpeg", "tiff"],
)
def test_header_size_is_read_without_decoding(ext: str, params: list[int]) -> None:
    data = _encode(ext, np.zeros((37, 53, 3), np.uint8), params)
    header = read_header(ext.strip(".").replace("jpg", "jpeg"), data)
    assert header is not None and (header.width, header.height) == (53, 37)


def test_jpeg_size_is_found_past_an_app_segment() -> None:
    data = _encode(".jpg", np.zeros((21, 34), np.uint8))
    comment = b"exif-like payload \xff\xc0 with a fake marker inside"
    with_app1 = data[:2] + b"\xff\xe1" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    header = read_header("jpeg", with_app1)
    assert header is not None and (header.width, header.height, header.depth) == (34, 21, 8)
    assert _read(with_app1).shape == (21, 34)


def test_pixel_limit_is_applied_from_the_header() -> None:
    data = _encode(".png", np.zeros((100, 100), np.uint8))
    assert _read(data, limits=DecodeLimits(max_pixels=10_000)).shape == (100, 100)
    with pytest.raises(ImageTooLarge) as err:
        _read(data, limits=DecodeLimits(max_pixels=9_999))
    assert err.value.code == "image_too_large" and "100x100" in err.value.message
