"""Turns a display-ready frame into one model input sample exactly as the manifest says, with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.manifest import Manifest

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


class Preprocessor:
    """frame (HxW or HxWx3 RGB, float32 in 0..1) -> sample (CxHxW or HxWxC) in the model's dtype.

    Resizing comes first so every later step touches the small image. Channel conversion after the
    resize is exact because both are linear per pixel.
    """

    def __init__(self, manifest: Manifest) -> None:
        spec, pp = manifest.input, manifest.preprocess
        self.height, self.width, self.channels = spec.height, spec.width, spec.channels
        self.channels_first = spec.layout == "NCHW"
        self.bgr = spec.color_order == "bgr"
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

    def _resize(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        if not self.letterbox:
            if (h, w) == (self.height, self.width):
                return frame
            return cv2.resize(frame, (self.width, self.height), interpolation=self.interpolation)
        ratio = min(self.width / w, self.height / h)
        new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
        resized = (
            frame if (new_h, new_w) == (h, w) else cv2.resize(frame, (new_w, new_h), interpolation=self.interpolation)
        )
        canvas = np.full((self.height, self.width, *frame.shape[2:]), self.pad_value, dtype=np.float32)
        top, left = (self.height - new_h) // 2, (self.width - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = resized
        return canvas

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        img = self._resize(np.asarray(frame, dtype=np.float32))
        if self.channels == 1:
            if img.ndim == 3:
                img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            img = img[:, :, None]
        else:
            if img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            elif self.bgr:
                img = img[:, :, ::-1]
        img = img * self.gain + self.offset
        if self.channels_first:
            img = img.transpose(2, 0, 1)
        return np.ascontiguousarray(img, dtype=self.dtype)
