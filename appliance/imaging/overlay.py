"""A heatmap drawn over the image it explains: the colour map laid on the windowed image, as a terminal shows it
and as the PACS receives it (delivery/overlay.py)."""

from __future__ import annotations

import os

import cv2
import numpy as np

from appliance.domain.result import Heatmap

ALPHA = 0.45  # the colour's weight where the map is at its peak; the image shows through everywhere
FLOOR = 0.2  # below this share of the peak, no colour: faint evidence would tint the whole image


def heat_on_source(heatmap: Heatmap, rows: int, cols: int) -> np.ndarray:
    """The map resampled onto a rows x cols source image's pixels, float32 in 0..1; past the grid's edge (where
    the extent is smaller than the image) the edge cells go on."""
    grid = np.frombuffer(heatmap.values, dtype=np.uint8).reshape(heatmap.height, heatmap.width)
    x0, y0, x1, y1 = heatmap.extent
    sx, sy = heatmap.width / (x1 - x0), heatmap.height / (y1 - y0)
    # Source pixel centre (c + 0.5, r + 0.5) -> grid coordinates (cell centres at integers), an affine map:
    # sampled bilinearly between cell centres.
    to_grid = np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]], dtype=np.float64)
    heat = cv2.warpAffine(
        grid.astype(np.float32) * np.float32(1 / 255),
        to_grid,
        (cols, rows),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.asarray(heat, dtype=np.float32)


def to_8bit(display: np.ndarray) -> np.ndarray:
    """A display frame (H x W or H x W x 3 RGB; 0..1 floats or 8-bit) as 8-bit, its channels as they are."""
    img = np.asarray(display)
    if img.dtype != np.uint8:
        img = np.round(np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return img


def to_gray8(display: np.ndarray) -> np.ndarray:
    """A display frame (H x W or H x W x 3 RGB; 0..1 floats or 8-bit) as 8-bit RGB."""
    img = to_8bit(display)
    if img.ndim == 2:
        img = np.repeat(img[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(img)


def render(display: np.ndarray, heatmap: Heatmap, *, alpha: float = ALPHA, floor: float = FLOOR) -> np.ndarray:
    """The overlay, H x W x 3 8-bit RGB at the display frame's size: the turbo colour map over the image, its
    opacity rising with the map from ``floor`` to ``alpha`` at the peak."""
    image = to_gray8(display)
    rows, cols = image.shape[:2]
    heat = np.round(heat_on_source(heatmap, rows, cols) * 255.0).astype(np.uint8)
    # Colour and opacity by table and blended by OpenCV: the finisher draws one for each image sent to a PACS.
    colour = cv2.LUT(cv2.cvtColor(heat, cv2.COLOR_GRAY2RGB), _TURBO)
    weight = cv2.LUT(heat, _weights(alpha, floor))
    return np.asarray(cv2.blendLinear(image, colour, 1.0 - weight, weight))


_TURBO = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8), cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)


def _weights(alpha: float, floor: float) -> np.ndarray:
    """Opacity per heat level: none up to ``floor``, rising to ``alpha`` at the peak."""
    level = np.arange(256, dtype=np.float32) / 255.0
    return (alpha * np.clip((level - floor) / max(1.0 - floor, 1e-6), 0.0, 1.0)).astype(np.float32)


def text_grid(heatmap: Heatmap) -> str:
    """The grid as a terminal shows it: one line per row, each cell a digit, its tenths of the peak (9 is 90%
    or more), and '.' under a tenth, so the hot region stands out from the noise."""
    grid = np.frombuffer(heatmap.values, dtype=np.uint8).reshape(heatmap.height, heatmap.width)
    tenths = np.minimum(grid.astype(np.int32) * 10 // 255, 9)
    return "\n".join(" ".join("." if t == 0 else str(t) for t in row) for row in tenths)


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """An 8-bit RGB image as a PNG file; OSError where it cannot be written."""
    # zlib's default level: a third smaller than OpenCV's fast default, for files that are kept and sent.
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6]):
        raise OSError(f"could not write {path}")
