"""A frame's heatmap as a result carries it: the backend's float map as an 8-bit grid, with the class it explains
and where the grid lies on the source image's pixels."""

from __future__ import annotations

import numpy as np

from appliance.domain.manifest import Manifest
from appliance.domain.result import Heatmap
from appliance.imaging.preprocess import Preprocessor
from appliance.imaging.types import ImageMeta


def heatmap_of(grid: np.ndarray, scores: np.ndarray, manifest: Manifest, meta: ImageMeta | None) -> Heatmap | None:
    """None where the manifest declares no heatmap or the map is not a finite H x W grid (the scores still
    stand: a heatmap explains a result, it is not one)."""
    spec = manifest.heatmap
    if spec is None or grid.ndim != 2 or grid.size == 0 or not np.all(np.isfinite(grid)):
        return None
    # The graph maps the decided class: the top logit, which is the top score under any activation.
    label = manifest.output.labels[int(np.argmax(scores))]
    values = np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)
    try:
        extent = _extent(manifest, meta, (grid.shape[0], grid.shape[1]))
    except ValueError:  # a grid the loader's check would have refused: placed nowhere rather than wrongly
        return None
    return Heatmap(
        width=int(grid.shape[1]),
        height=int(grid.shape[0]),
        values=values.tobytes(),
        label=label,
        method=spec.method,
        extent=extent,
    )


def _extent(manifest: Manifest, meta: ImageMeta | None, grid_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where the grid's edges fall on the source: the model's input covers the source as preprocessing placed it,
    and the grid covers the input's first cells x stride pixels (a pool drops what is left over)."""
    spec, spec_in = manifest.heatmap, manifest.input
    assert spec is not None
    height, width = spec_in.height, spec_in.width
    stride_y, stride_x = spec.cell((height, width), grid_hw)
    if meta is None or meta.rows <= 0 or meta.columns <= 0:
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)  # the model input's own pixels
    else:
        x0, y0, x1, y1 = Preprocessor(manifest).source_extent(meta.rows, meta.columns)
    return (
        x0,
        y0,
        x0 + (x1 - x0) * grid_hw[1] * stride_x / width,
        y0 + (y1 - y0) * grid_hw[0] * stride_y / height,
    )
