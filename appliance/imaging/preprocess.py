"""Turns a display-ready frame into one model input sample exactly as the manifest says, with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.domain.errors import UnsupportedPixelFormat
from appliance.domain.manifest import Manifest

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


class Preprocessor:
    """frame (HxW or HxWx3 RGB, float32 in 0..1) -> sample (CxHxW or HxWxC) in the model's dtype.

    Every step works on the smaller of the frame and the model input: colour becomes gray before a
    shrinking resize, gray becomes colour only after it. The order does not change the result, since
    resizing, the luma weights and replication are all linear per pixel.
    """

    def __init__(self, manifest: Manifest) -> None:
        spec, pp = manifest.input, manifest.preprocess
        self.height, self.width, self.channels = spec.height, spec.width, spec.channels
        self.channels_first = spec.layout == "NCHW"
        self.bgr = spec.channels == 3 and spec.color_order == "bgr"
        self.dtype = np.dtype(spec.dtype)
        self.letterbox = pp.resize == "letterbox"
        self.pad_value = pp.pad_value
        self.interpolation = INTERPOLATIONS[pp.interpolation]
        lo, hi = pp.scale
        mean = np.asarray(pp.mean, dtype=np.float32)
        std = np.asarray(pp.std, dtype=np.float32)
        # scale then (x - mean) / std, folded into one multiply-add per channel
        self.gain = ((hi - lo) / std).astype(np.float32)
        self.offset = ((lo - mean) / std).astype(np.float32)

    def _target(self, h: int, w: int) -> tuple[int, int]:
        """The size a frame of h x w is resized to (before any letterbox padding)."""
        if not self.letterbox:
            return self.height, self.width
        ratio = min(self.width / w, self.height / h)
        return min(self.height, max(1, round(h * ratio))), min(self.width, max(1, round(w * ratio)))

    def shrink_target(self, h: int, w: int) -> tuple[int, int] | None:
        """For readers that can shrink first: the size an h x w frame is shrunk to with area averaging,
        or None when this preprocessing does not shrink it that way (enlarging, or another interpolation)."""
        if self.interpolation != cv2.INTER_AREA:
            return None
        rows, cols = self._target(h, w)
        if rows > h or cols > w or (rows, cols) == (h, w):
            return None
        return rows, cols

    def source_extent(self, rows: int, cols: int) -> tuple[float, float, float, float]:
        """Where the model input's outer edges fall in a rows x cols source image's pixel coordinates,
        (x0, y0, x1, y1): the source itself when stretched, past its edges by the padding when letterboxed."""
        if not self.letterbox:
            return 0.0, 0.0, float(cols), float(rows)
        new_h, new_w = self._target(rows, cols)
        top, left = (self.height - new_h) // 2, (self.width - new_w) // 2
        sx, sy = cols / new_w, rows / new_h
        return -left * sx, -top * sy, (self.width - left) * sx, (self.height - top) * sy

    def _resize(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        if not self.letterbox:
            if (h, w) == (self.height, self.width):
                return img
            return cv2.resize(img, (self.width, self.height), interpolation=self.interpolation)
        new_h, new_w = self._target(h, w)
        if (new_h, new_w) != (h, w):
            img = cv2.resize(img, (new_w, new_h), interpolation=self.interpolation)
        canvas = np.full((self.height, self.width, *img.shape[2:]), self.pad_value, dtype=np.float32)
        top, left = (self.height - new_h) // 2, (self.width - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = img
        return canvas

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        img: np.ndarray = np.asarray(frame, dtype=np.float32)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if img.ndim != 2 and (img.ndim != 3 or img.shape[2] != 3):
            raise UnsupportedPixelFormat(f"A frame of shape {img.shape} cannot be preprocessed; expected HxW or HxWx3.")
        shrinking = img.shape[0] * img.shape[1] > self.height * self.width
        if self.channels == 1 and img.ndim == 3 and shrinking:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        img = self._resize(img)
        if self.channels == 1:
            if img.ndim == 3:
                img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            img = img[:, :, None]
        elif img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif self.bgr:
            img = img[:, :, ::-1]
        img = img * self.gain + self.offset
        if self.channels_first:
            img = img.transpose(2, 0, 1)
        return np.ascontiguousarray(img, dtype=self.dtype)
