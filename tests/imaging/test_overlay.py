"""The heatmap on the image: a grid cell lands on the source pixels it covers, stretched or letterboxed, and the
image stays as it is where the map is faint."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.domain.manifest import load_manifest
from appliance.domain.result import Heatmap
from appliance.imaging.overlay import FLOOR, heat_on_source, render, text_grid, to_gray8, write_png
from appliance.imaging.preprocess import Preprocessor

TEST_MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"  # letterbox, 64 x 64 input


def one_hot(width: int, height: int, row: int, col: int, extent: tuple[float, float, float, float]) -> Heatmap:
    values = np.zeros((height, width), dtype=np.uint8)
    values[row, col] = 255
    return Heatmap(width, height, values.tobytes(), "lesion", "cam", extent)


def centroid(heat: np.ndarray) -> tuple[float, float]:
    """The heat's centre of mass in pixel coordinates (x, y), pixel centres at + 0.5."""
    rows, cols = np.mgrid[: heat.shape[0], : heat.shape[1]]
    total = float(heat.sum())
    return float((heat * (cols + 0.5)).sum()) / total, float((heat * (rows + 0.5)).sum()) / total


def test_a_cell_of_a_stretched_grid_lands_on_its_share_of_the_image() -> None:
    # 80 x 40 source, 4 x 4 grid over all of it: cell (row 1, col 2) covers x 40..60, y 10..20.
    heat = heat_on_source(one_hot(4, 4, 1, 2, (0.0, 0.0, 80.0, 40.0)), rows=40, cols=80)

    assert heat.shape == (40, 80) and heat.dtype == np.float32
    peak_row, peak_col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert 10 <= peak_row < 20 and 40 <= peak_col < 60
    assert centroid(heat) == pytest.approx((50.0, 15.0), abs=0.05)
    # Bilinear between cell centres: nothing reaches a neighbour's centre or beyond.
    ys, xs = np.nonzero(heat > 0)
    assert xs.min() >= 30 and xs.max() < 70 and ys.min() >= 5 and ys.max() < 25


def test_a_cell_of_a_letterboxed_grid_lands_past_the_padding() -> None:
    # 100 x 50 into the model's 64 x 64, aspect kept: resized to 64 x 32, 16 rows of padding above and below,
    # so a model pixel is 1.5625 source pixels and the grid reaches 25 source pixels past the top and bottom.
    manifest = load_manifest(TEST_MODEL, require_onnx=False).manifest
    extent = Preprocessor(manifest).source_extent(50, 100)
    assert extent == pytest.approx((0.0, -25.0, 100.0, 75.0))

    # 8 x 8 grid, cells of 12.5 source pixels: cell (row 3, col 5) covers x 62.5..75, y 12.5..25.
    heat = heat_on_source(one_hot(8, 8, 3, 5, extent), rows=50, cols=100)
    peak_row, peak_col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert 12 <= peak_row < 25 and 62 <= peak_col < 75
    assert centroid(heat) == pytest.approx((68.75, 18.75), abs=0.05)

    # A cell over the padding alone (row 0: y -25..-12.5) leaves the image untouched.
    assert not heat_on_source(one_hot(8, 8, 0, 5, extent), rows=50, cols=100).any()


def test_the_grid_cell_is_where_the_preprocessor_put_those_pixels() -> None:
    """The extent's convention checked against the preprocessing itself: the source pixels under a cell go to
    that cell of the model's input."""
    manifest = load_manifest(TEST_MODEL, require_onnx=False).manifest
    preprocessor = Preprocessor(manifest)
    source = np.zeros((50, 100), dtype=np.float32)
    source[13:25, 63:75] = 1.0  # the pixels whose centres lie in cell (3, 5) of the 8 x 8 grid (see above)
    sample = (preprocessor(source)[0] - preprocessor.offset[0]) / preprocessor.gain[0]  # back to 0..1
    cell = sample[24:32, 40:48]  # cell (3, 5) of the 64 x 64 input
    assert cell.sum() / sample.sum() > 0.95


def test_render_keeps_the_image_where_the_map_is_below_the_floor() -> None:
    display = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (48, 1))  # a ramp: any tint would show
    values = np.full((4, 4), int(FLOOR * 255) - 5, dtype=np.uint8)
    values[2, 1] = 255
    heatmap = Heatmap(4, 4, values.tobytes(), "lesion", "cam", (0.0, 0.0, 64.0, 48.0))

    out = render(display, heatmap)

    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    image = to_gray8(display)
    heat = heat_on_source(heatmap, 48, 64)
    faint = heat < FLOOR
    assert faint.sum() > 48 * 64 // 2
    assert np.array_equal(out[faint], image[faint])
    # At the hot cell's centre (x 24, y 30) the colour map shows: the pixel is no longer gray.
    r, g, b = (int(v) for v in out[30, 24])
    assert max(r, g, b) - min(r, g, b) > 40


def test_render_takes_an_rgb_display_frame_and_8_bit_input() -> None:
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, :, 1] = 200
    heatmap = Heatmap(2, 2, bytes([0, 0, 0, 0]), "lesion", "cam", (0.0, 0.0, 30.0, 20.0))
    assert np.array_equal(render(rgb, heatmap), rgb)


def test_text_grid_shows_tenths_of_the_peak() -> None:
    values = bytes([0, 25, 26, 128, 229, 230, 255, 51, 0])
    text = text_grid(Heatmap(3, 3, values, "lesion", "cam", (0.0, 0.0, 3.0, 3.0)))
    assert text.splitlines() == [". . 1", "5 8 9", "9 2 ."]


def test_write_png_round_trips_and_says_when_it_cannot(tmp_path: Path) -> None:
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[2, 3] = (255, 0, 0)
    write_png(tmp_path / "x.png", rgb)
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "x.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, rgb)
    with pytest.raises(OSError, match="could not write"):
        write_png(tmp_path / "missing" / "x.png", rgb)
