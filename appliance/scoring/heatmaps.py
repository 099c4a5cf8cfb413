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
    return Heatmap(
        width=int(grid.shape[1]),
        height=int(grid.shape[0]),
        values=values.tobytes(),
        label=label,
        method=spec.method,
        extent=_extent(manifest, meta),
    )


def _extent(manifest: Manifest, meta: ImageMeta | None) -> tuple[float, float, float, float]:
    if meta is None or meta.rows <= 0 or meta.columns <= 0:
        return 0.0, 0.0, float(manifest.input.width), float(manifest.input.height)  # the model input's own pixels
    return Preprocessor(manifest).source_extent(meta.rows, meta.columns)
