"""The per-input work before the model: read bytes, decode, preprocess. Shared by the daemon and `appliance score`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

from appliance.domain.errors import DecodeOutOfMemory, InputTooLarge
from appliance.domain.manifest import Manifest
from appliance.imaging.overlay import to_8bit
from appliance.imaging.preprocess import Preprocessor
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodedImage, DecodeLimits, ImageMeta
from appliance.prepare.limits import LimitsConfig

# Display frames of one input together hold at most this many pixels (8-bit: bytes per channel), whatever its
# frame count: what crosses from a decode worker to the daemon, and what the PACS's overlays are drawn on (on
# the finisher's thread, stored in one transaction: a long series gets smaller overlays, not a stalled finisher).
DISPLAY_BUDGET_PIXELS = 8 << 20


@dataclass(frozen=True)
class Prepared:
    """An input ready for the model: one tensor per frame, without the batch axis."""

    tensors: tuple[np.ndarray, ...]
    meta: ImageMeta
    decode_ms: float
    preprocess_ms: float
    # The frames as a reader sees them, 8-bit (H x W gray, H x W x 3 RGB), at most `display_side` on their longer
    # side, for the heatmap overlay sent to the PACS: only for a DICOM input, only when the Preparer was asked.
    display: tuple[np.ndarray, ...] = ()


class Preparer:
    """Decode + preprocess exactly as the manifest says; raises an InputRejected subclass for bad input."""

    def __init__(
        self, manifest: Manifest, limits: LimitsConfig, *, shrink_first: bool = True, display_side: int = 0
    ) -> None:
        self.manifest = manifest
        # Large grayscale DICOM frames are shrunk as stored integers before windowing (see dicom.py).
        self.shrink_first = shrink_first
        self.display_side = display_side  # 0: no display frames (the cost of none)
        self.max_bytes = int(limits.max_file_mb * 1024 * 1024)
        self.limits = DecodeLimits(
            max_pixels=limits.max_pixels,
            max_frames=limits.max_frames,
            multiframe=limits.multiframe,
            max_file_bytes=self.max_bytes,
        )
        self.preprocessor = Preprocessor(manifest)

    def check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise InputTooLarge(
                f"The file is {size / 2**20:.0f} MiB; the limit is {self.max_bytes / 2**20:.0f} MiB "
                "(limits.max_file_mb)."
            )

    def prepare(self, data: bytes, name: str = "") -> Prepared:
        self.check_size(len(data))
        t0 = time.perf_counter()
        try:
            image = decode(
                data,
                limits=self.limits,
                preprocess=self.manifest.preprocess,
                name=name,
                shrink=self.preprocessor.shrink_target if self.shrink_first else None,
                display=self._display_target if self.display_side else None,
            )
            t1 = time.perf_counter()
            tensors = tuple(self.preprocessor(frame) for frame in image.frames)
        except MemoryError:
            # Past a decode worker's cap (limits.worker_memory_mb), or the host's memory: this input's
            # fault. `from None`: the error's traceback would keep the frames' arrays alive.
            raise DecodeOutOfMemory() from None
        t2 = time.perf_counter()
        try:
            display = self._display(image) if image.display_frames else ()
        except MemoryError:  # the overlay's frames only: the input is still scored, without an overlay
            display = ()
        return Prepared(
            tensors=tensors,
            meta=image.meta,
            decode_ms=(t1 - t0) * 1e3,
            preprocess_ms=(t2 - t1) * 1e3,
            display=display,
        )

    def _display_target(self, rows: int, cols: int) -> tuple[int, int] | None:
        """A frame's size as shown: its stored size divided by the least whole number that brings its longer side
        to `display_side` or under (exact block means are the cheap shrink); None where it is already there."""
        k = -(-max(rows, cols) // self.display_side)
        return None if k <= 1 else (max(1, rows // k), max(1, cols // k))

    def _display(self, image: DecodedImage) -> tuple[np.ndarray, ...]:
        """The frames as shown, 8-bit, area-shrunk to the display size, within the input's pixel budget. They come
        from the same decode as the model's (frames shrunk first for the model were shrunk, from the same stored
        integers, to the display size too), so the model's tensors never depend on whether a PACS gets overlays."""
        rows, cols = image.meta.rows or image.frames[0].shape[0], image.meta.columns or image.frames[0].shape[1]
        size = self._display_target(rows, cols) or (rows, cols)
        budget = math.sqrt(DISPLAY_BUDGET_PIXELS / max(len(image.frames) * size[0] * size[1], 1))
        if budget < 1.0:
            size = max(1, round(size[0] * budget)), max(1, round(size[1] * budget))
        return tuple(_gray8(frame, size) for frame in image.display_frames)


def _gray8(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A display frame at ``size`` (area-shrunk), 8-bit; a gray one stays one channel (a third of the bytes)."""
    if frame.shape[:2] != size:
        frame = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(to_8bit(frame))
