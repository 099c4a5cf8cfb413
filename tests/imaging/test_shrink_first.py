"""Shrinking stored integers before windowing: what it changes, measured against the full-resolution path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import LimitsConfig
from appliance.domain.manifest import load_manifest
from appliance.imaging.preprocess import Preprocessor
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodeLimits
from appliance.prepare.preparer import Preparer
from bench.inputs import write_inputs

from ..integration.conftest import DEFAULT_MODEL, TEST_MODEL


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two full-size 12-bit radiographs: one MONOCHROME2 CR/DX, one MONOCHROME1."""
    return write_inputs(tmp_path_factory.mktemp("radiographs"), "radiograph", 2)


@pytest.mark.parametrize("model", [TEST_MODEL, DEFAULT_MODEL], ids=["letterbox-1ch", "stretch-3ch"])
def test_shrink_first_stays_within_three_grey_levels_of_the_full_resolution_path(model: Path, radiographs) -> None:
    manifest = load_manifest(model, require_onnx=False).manifest
    fast, exact = Preparer(manifest, LimitsConfig()), Preparer(manifest, LimitsConfig(), shrink_first=False)
    gain = float(np.abs(fast.preprocessor.gain).max())
    for path in radiographs:
        data = path.read_bytes()
        a, b = fast.prepare(data).tensors[0], exact.prepare(data).tensors[0]
        assert a.shape == b.shape
        diff = np.abs(a - b) / gain  # back to display units 0..1
        # Measured: at most 2.2 grey levels of 255 where a window clips inside a block, 0.32 on average
        # (the 2x2 pre-halving widens the averaging kernel a little; one fractional step gave 0.02).
        assert diff.max() < 3 / 255 and diff.mean() < 0.5 / 255, (diff.max(), diff.mean())


def test_the_decoder_hands_over_the_small_image_only(radiographs) -> None:
    manifest = load_manifest(TEST_MODEL).manifest
    pre = Preprocessor(manifest)
    image = decode(radiographs[0].read_bytes(), limits=DecodeLimits(), preprocess=manifest.preprocess,
                   shrink=pre.shrink_target)  # fmt: skip
    (frame,) = image.frames
    assert max(frame.shape) == 64 and frame.dtype == np.float32  # never a full-size float copy


def test_shrink_target_only_for_area_shrinks() -> None:
    manifest = load_manifest(TEST_MODEL).manifest  # 64 x 64, letterbox, area
    pre = Preprocessor(manifest)
    assert pre.shrink_target(2048, 2500) == (52, 64)  # aspect kept: the letterbox pads the rest
    assert pre.shrink_target(32, 32) is None  # enlarging
    assert pre.shrink_target(64, 64) is None  # nothing to do
    cubic = manifest.model_copy(
        update={"preprocess": manifest.preprocess.model_copy(update={"interpolation": "cubic"})}
    )
    assert Preprocessor(cubic).shrink_target(2048, 2500) is None


def test_without_a_window_the_frame_is_not_shrunk_first(tmp_path: Path) -> None:
    """The display range is then the frame's own min and max, which averaging would move."""
    import pydicom

    (path,) = write_inputs(tmp_path, "radiograph", 1)
    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth
    pixels = ds.pixel_array.copy()
    pixels[100, 100] = 4095  # one hot pixel sets the top of the range
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    manifest = load_manifest(TEST_MODEL).manifest
    data = path.read_bytes()
    fast = Preparer(manifest, LimitsConfig()).prepare(data).tensors[0]
    exact = Preparer(manifest, LimitsConfig(), shrink_first=False).prepare(data).tensors[0]
    assert np.array_equal(fast, exact)
