"""Manifest-driven preprocessing: layout, dtype, resize policies, channels, scale and normalisation."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from appliance.domain.errors import UnsupportedPixelFormat
from appliance.domain.manifest import Manifest
from appliance.imaging.preprocess import INTERPOLATIONS, Preprocessor


def _manifest(input: dict[str, Any] | None = None, preprocess: dict[str, Any] | None = None) -> Manifest:
    spec: dict[str, Any] = {"name": "x", "layout": "NCHW", "height": 32, "width": 48, "channels": 1}
    spec.update(input or {})
    return Manifest.model_validate(
        {
            "model": {"name": "m", "version": "1"},
            "input": spec,
            "preprocess": preprocess or {},
            "output": {"name": "y", "labels": ["a"]},
        }
    )


def _random(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layout_shape_and_dtype(layout: str, channels: int, dtype: str) -> None:
    pre = Preprocessor(_manifest(input={"layout": layout, "channels": channels, "dtype": dtype}))
    for frame in (_random((100, 60)), _random((100, 60, 3))):
        sample = pre(frame)
        assert sample.shape == ((channels, 32, 48) if layout == "NCHW" else (32, 48, channels))
        assert sample.dtype == np.dtype(dtype) and sample.flags.c_contiguous


def test_stretch_resizes_each_axis_with_the_named_interpolation() -> None:
    frame = _random((100, 60))
    for name, flag in INTERPOLATIONS.items():
        sample = Preprocessor(_manifest(preprocess={"interpolation": name}))(frame)
        assert np.allclose(sample[0], cv2.resize(frame, (48, 32), interpolation=flag), atol=1e-6), name
    same_size = _random((32, 48))
    assert np.array_equal(Preprocessor(_manifest())(same_size)[0], same_size)


def test_letterbox_pads_the_short_axis_and_centres() -> None:
    pre = Preprocessor(_manifest(preprocess={"resize": "letterbox", "pad_value": 0.25, "interpolation": "nearest"}))
    # A square into 32x48: a 32x32 image in the middle, 8 columns of padding each side.
    out = pre(np.ones((100, 100), np.float32))[0]
    assert np.all(out[:, :8] == 0.25) and np.all(out[:, -8:] == 0.25)
    assert np.all(out[:, 8:40] == 1.0)
    # A wide strip into 32x48: full width, 12 px high, 10 rows of padding above and below.
    strip = pre(np.ones((25, 100), np.float32))[0]
    assert np.all(strip[:10] == 0.25) and np.all(strip[-10:] == 0.25)
    assert np.all(strip[10:22] == 1.0)


def test_letterbox_keeps_the_aspect_ratio_of_the_content() -> None:
    frame = _random((64, 64))
    out = Preprocessor(_manifest(preprocess={"resize": "letterbox", "interpolation": "area"}))(frame)[0]
    assert np.allclose(out[:, 8:40], cv2.resize(frame, (32, 32), interpolation=cv2.INTER_AREA), atol=1e-6)


def test_padding_goes_through_scale_and_normalisation_like_pixels() -> None:
    m = _manifest(
        input={"height": 4, "width": 8},
        preprocess={"resize": "letterbox", "pad_value": 0.5, "scale": [0, 255], "mean": [100.0], "std": [2.0]},
    )
    out = Preprocessor(m)(np.zeros((4, 4), np.float32))[0]
    assert np.all(out[:, :2] == (0.5 * 255 - 100) / 2) and np.all(out[:, 2:6] == -50.0)


def test_scale_mean_std_per_channel() -> None:
    frame = np.full((10, 10, 3), 0.5, np.float32)
    m = _manifest(
        input={"channels": 3, "height": 10, "width": 10},
        preprocess={"scale": [0, 255], "mean": [100.0, 127.5, 0.0], "std": [1.0, 2.0, 127.5]},
    )
    out = Preprocessor(m)(frame)
    assert out[:, 0, 0] == pytest.approx([27.5, 0.0, 1.0])


def test_one_mean_and_std_broadcast_to_every_channel() -> None:
    m = _manifest(
        input={"channels": 3, "height": 2, "width": 2, "layout": "NHWC"},
        preprocess={"scale": [-1, 1], "mean": [0.5], "std": [0.25]},
    )
    out = Preprocessor(m)(np.full((2, 2), 0.75, np.float32))
    assert np.allclose(out, (-1 + 0.75 * 2 - 0.5) / 0.25)


def test_gray_to_three_identical_channels() -> None:
    out = Preprocessor(_manifest(input={"channels": 3}))(_random((70, 90)))
    assert out.shape == (3, 32, 48)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


@pytest.mark.parametrize("shape", [(100, 150, 3), (10, 15, 3)], ids=["shrinking", "growing"])
def test_colour_to_one_channel_is_bt601_luma_in_either_order(shape: tuple[int, ...]) -> None:
    frame = _random(shape)
    out = Preprocessor(_manifest(preprocess={"interpolation": "linear"}))(frame)[0]
    reference = cv2.cvtColor(cv2.resize(frame, (48, 32), interpolation=cv2.INTER_LINEAR), cv2.COLOR_RGB2GRAY)
    assert np.allclose(out, reference, atol=1e-5)
    red = np.zeros((10, 10, 3), np.float32)
    red[..., 0] = 1.0
    assert Preprocessor(_manifest(input={"height": 10, "width": 10}))(red)[0, 0, 0] == pytest.approx(0.299, abs=1e-3)


def test_bgr_order_swaps_red_and_blue() -> None:
    frame = np.zeros((10, 10, 3), np.float32)
    frame[..., 0] = 1.0  # pure red
    m = _manifest(input={"height": 10, "width": 10, "channels": 3, "color_order": "bgr"})
    assert Preprocessor(m)(frame)[:, 0, 0] == pytest.approx([0.0, 0.0, 1.0])
    rgb = _manifest(input={"height": 10, "width": 10, "channels": 3})
    assert Preprocessor(rgb)(frame)[:, 0, 0] == pytest.approx([1.0, 0.0, 0.0])


def test_a_single_channel_axis_is_accepted_and_other_shapes_refused() -> None:
    frame = _random((40, 40))
    pre = Preprocessor(_manifest())
    assert np.array_equal(pre(frame[:, :, None]), pre(frame))
    with pytest.raises(UnsupportedPixelFormat):
        pre(_random((40, 40, 4)))


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize(("rows", "cols"), [(100, 100), (25, 100), (300, 90), (32, 48)])
def test_source_extent_maps_the_model_input_back_onto_the_source_pixels(resize: str, rows: int, cols: int) -> None:
    """A bright dot in the source lands where the extent says the model input's pixel covers it."""
    pre = Preprocessor(_manifest(preprocess={"resize": resize, "interpolation": "area"}))
    x0, y0, x1, y1 = pre.source_extent(rows, cols)
    if resize == "stretch":
        assert (x0, y0, x1, y1) == (0.0, 0.0, cols, rows)
    for dot_r, dot_c in ((rows // 4, cols // 3), (rows - 2, cols - 2)):
        frame = np.zeros((rows, cols), np.float32)
        frame[dot_r, dot_c] = 1.0
        sample = pre(frame)[0]
        r, c = np.unravel_index(int(np.argmax(sample)), sample.shape)
        # The model pixel's centre, in source pixels, is within one model pixel of the dot.
        x = x0 + (c + 0.5) * (x1 - x0) / 48
        y = y0 + (r + 0.5) * (y1 - y0) / 32
        assert abs(x - (dot_c + 0.5)) <= (x1 - x0) / 48 and abs(y - (dot_r + 0.5)) <= (y1 - y0) / 32
