"""PNG/JPEG/TIFF reading and manifest-driven preprocessing, on images generated here."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from appliance.imaging.preprocess import Preprocessor
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodeLimits
from appliance.manifest import Manifest, Preprocess


def _encode(ext: str, arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


def _read(data: bytes, preprocess: Preprocess | None = None) -> np.ndarray:
    return decode(data, limits=DecodeLimits(), preprocess=preprocess or Preprocess()).frames[0]


def test_8_and_16_bit_png_and_tiff_map_their_dtype_range_to_0_1() -> None:
    g8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.allclose(_read(_encode(".png", g8)), g8 / 255.0, atol=1e-7)
    g16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    assert np.allclose(_read(_encode(".png", g16)), g16 / 65535.0, atol=1e-7)
    assert np.allclose(_read(_encode(".tiff", g16)), g16 / 65535.0, atol=1e-7)
    stretched = _read(_encode(".png", (g16 // 4).astype(np.uint16)), Preprocess(raster_window="min_max"))
    assert stretched.min() == 0.0 and stretched.max() == 1.0


def test_colour_is_rgb_and_alpha_is_dropped() -> None:
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    rgb = _read(_encode(".png", bgr))
    assert rgb.shape == (8, 8, 3) and np.allclose(rgb[0, 0], [1.0, 0.0, 0.0])
    bgra = np.dstack([bgr, np.full((8, 8), 7, np.uint8)])
    assert _read(_encode(".png", bgra)).shape == (8, 8, 3)
    jpeg = _read(_encode(".jpg", bgr))
    assert jpeg[4, 4, 0] > 0.9 and jpeg[4, 4, 1] < 0.1


def _manifest(**over: object) -> Manifest:
    spec = {"name": "x", "layout": "NCHW", "height": 32, "width": 48, "channels": 1}
    spec.update(over.pop("input", {}))  # type: ignore[call-overload]
    return Manifest.model_validate(
        {
            "model": {"name": "m", "version": "1"},
            "input": spec,
            "preprocess": over.get("preprocess", {}),
            "output": {"name": "y", "labels": ["a"]},
        }
    )


def test_layout_dtype_and_stretch() -> None:
    frame = np.random.default_rng(0).random((100, 60), dtype=np.float32)
    nchw = Preprocessor(_manifest())(frame)
    assert nchw.shape == (1, 32, 48) and nchw.dtype == np.float32 and nchw.flags.c_contiguous
    nhwc = Preprocessor(_manifest(input={"layout": "NHWC", "channels": 3, "dtype": "float16"}))(frame)
    assert nhwc.shape == (32, 48, 3) and nhwc.dtype == np.float16
    assert np.array_equal(nhwc[..., 0], nhwc[..., 1]) and np.array_equal(nhwc[..., 1], nhwc[..., 2])


def test_letterbox_centres_and_pads() -> None:
    frame = np.ones((100, 100), np.float32)  # square into 32x48: 32x32 in the middle, 8 px of padding each side
    out = Preprocessor(_manifest(preprocess={"resize": "letterbox", "pad_value": 0.25}))(frame)[0]
    assert np.allclose(out[:, :8], 0.25) and np.allclose(out[:, -8:], 0.25)
    assert np.allclose(out[:, 8:40], 1.0)


def test_scale_mean_std_per_channel() -> None:
    frame = np.full((10, 10, 3), 0.5, np.float32)
    m = _manifest(
        input={"channels": 3, "height": 10, "width": 10},
        preprocess={"scale": [0, 255], "mean": [100.0, 127.5, 0.0], "std": [1.0, 2.0, 127.5]},
    )
    out = Preprocessor(m)(frame)
    assert out[:, 0, 0] == pytest.approx([27.5, 0.0, 1.0])


def test_colour_frame_to_one_channel_and_bgr_order() -> None:
    frame = np.zeros((10, 10, 3), np.float32)
    frame[..., 0] = 1.0  # pure red
    gray = Preprocessor(_manifest(input={"height": 10, "width": 10}))(frame)
    assert gray[0, 0, 0] == pytest.approx(0.299, abs=1e-3)  # ITU-R BT.601 luma, as OpenCV computes it
    bgr = Preprocessor(_manifest(input={"height": 10, "width": 10, "channels": 3, "color_order": "bgr"}))(frame)
    assert bgr[:, 0, 0] == pytest.approx([0.0, 0.0, 1.0])
