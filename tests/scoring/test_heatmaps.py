"""A frame's float map becomes the result's 8-bit heatmap: the class it explains and where it lies on the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.domain.manifest import load_manifest
from appliance.imaging.types import ImageMeta
from appliance.scoring.heatmaps import heatmap_of

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_the_map_is_quantised_and_explains_the_top_class() -> None:
    manifest = load_manifest(MODELS / "brain-mri-vgg16", require_onnx=False).manifest
    grid = np.zeros((7, 7), np.float32)
    grid[2, 5], grid[6, 0] = 1.0, 0.5
    meta = ImageMeta(source_format="dicom", rows=512, columns=256)
    heat = heatmap_of(grid, np.array([0.1, 0.2, 0.6, 0.1]), manifest, meta)
    assert heat is not None
    assert (heat.width, heat.height, heat.label, heat.method) == (7, 7, "notumor", "gradcam")
    values = np.frombuffer(heat.values, np.uint8).reshape(7, 7)
    assert values[2, 5] == 255 and values[6, 0] == 128 and values.sum() == 255 + 128
    # Stretched onto the whole source, but the 7 cells of 32 px cover 224 of the input's 240 (the last pool
    # drops the rest): the grid reaches 224/240 of the way across.
    assert heat.extent == pytest.approx((0.0, 0.0, 256.0 * 224 / 240, 512.0 * 224 / 240))


def test_no_map_where_the_manifest_declares_none_or_the_values_are_not_finite() -> None:
    manifest = load_manifest(MODELS / "pipeline-test").manifest
    meta = ImageMeta(source_format="png", rows=64, columns=64)
    grid = np.full((8, 8), 0.5, np.float32)
    assert heatmap_of(grid, np.array([0.9]), manifest, meta) is not None
    grid[3, 3] = np.nan
    assert heatmap_of(grid, np.array([0.9]), manifest, meta) is None
    plain = manifest.model_copy(update={"heatmap": None})
    assert heatmap_of(np.zeros((8, 8), np.float32), np.array([0.9]), plain, meta) is None


def test_a_grid_is_placed_on_the_input_by_its_stride_or_refused_with_the_reason() -> None:
    spec = load_manifest(MODELS / "brain-mri-vgg16", require_onnx=False).manifest.heatmap
    assert spec is not None and spec.stride == 32
    assert spec.cell((240, 240), (7, 7)) == (32, 32)
    undeclared = spec.model_copy(update={"stride": None})
    assert undeclared.cell((64, 64), (8, 8)) == (8, 8)  # a whole number of cells needs none
    with pytest.raises(ValueError, match=r"not a whole number of the heatmap's 7 cells: declare heatmap\.stride"):
        undeclared.cell((240, 240), (7, 7))
    with pytest.raises(ValueError, match="only 31 to 34 fit"):
        spec.model_copy(update={"stride": 36}).cell((240, 240), (7, 7))
