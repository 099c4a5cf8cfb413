"""The per-input work before the model: read bytes, decode, preprocess. Shared by the daemon and `appliance score`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from appliance.config import LimitsConfig
from appliance.domain.errors import DecodeOutOfMemory, InputTooLarge
from appliance.domain.manifest import Manifest
from appliance.imaging.preprocess import Preprocessor
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodeLimits, ImageMeta


@dataclass(frozen=True)
class Prepared:
    """An input ready for the model: one tensor per frame, without the batch axis."""

    tensors: tuple[np.ndarray, ...]
    meta: ImageMeta
    decode_ms: float
    preprocess_ms: float


class Preparer:
    """Decode + preprocess exactly as the manifest says; raises an InputRejected subclass for bad input."""

    def __init__(self, manifest: Manifest, limits: LimitsConfig, *, shrink_first: bool = True) -> None:
        self.manifest = manifest
        # Large grayscale DICOM frames are shrunk as stored integers before windowing (see dicom.py).
        self.shrink_first = shrink_first
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
            )
            t1 = time.perf_counter()
            tensors = tuple(self.preprocessor(frame) for frame in image.frames)
        except MemoryError:
            # Past a decode worker's cap (limits.worker_memory_mb), or the host's memory: this input's
            # fault. `from None`: the error's traceback would keep the frames' arrays alive.
            raise DecodeOutOfMemory() from None
        t2 = time.perf_counter()
        return Prepared(tensors=tensors, meta=image.meta, decode_ms=(t1 - t0) * 1e3, preprocess_ms=(t2 - t1) * 1e3)
