"""What a reader hands to preprocessing: display-ready frames and the non-pixel facts of the input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class ImageMeta:
    """Identifiers of the input. UIDs and accession number go into results, never into logs."""

    source_format: str  # "dicom", "png", "jpeg", "tiff"
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    accession_number: str = ""
    modality: str = ""
    transfer_syntax: str = ""  # DICOM transfer syntax name, "" for raster files
    photometric: str = ""  # as read, e.g. MONOCHROME1, RGB, YBR_FULL_422
    rows: int = 0  # the source image's size in pixels, before any shrinking: what a heatmap maps onto
    columns: int = 0
    images_in_acquisition: int = 0  # (0020,1002) where the scanner sets it: how many images its series will hold


@dataclass(frozen=True)
class DecodedImage:
    """One input, decoded. Each frame is float32, HxW (grayscale) or HxWx3 (RGB order), in display
    units 0..1: modality LUT and VOI/window applied, MONOCHROME1 inverted, colour converted to RGB."""

    frames: tuple[np.ndarray, ...]
    meta: ImageMeta
    original_frame_count: int = 1
    # Asked for with `display`: each frame as shown, for pictures (heatmap overlays), from the same decode; a
    # grayscale DICOM frame shrunk as stored integers to the display size where `frames` were shrunk to the
    # model's, else the frame in `frames` itself.
    display_frames: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class DecodeLimits:
    """Guards against hostile or absurd inputs."""

    max_pixels: int = 80_000_000  # per frame; a decompression bomb is refused before decoding
    max_frames: int = 512
    multiframe: Literal["per_frame", "reject"] = "per_frame"
    max_file_bytes: int = 2048 << 20  # caps what a Deflated DICOM data set may inflate to


# (rows, columns) of a frame -> the size preprocessing will shrink it to, or None if it will not shrink
# it. Readers that can shrink stored integers before any float conversion ask this first.
ShrinkTo = Callable[[int, int], "tuple[int, int] | None"]
