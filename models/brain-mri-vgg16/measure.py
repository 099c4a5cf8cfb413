"""Run the VGG16 model on pydicom's offline MR test files and time it: the figures in MODEL_CARD.md."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pydicom
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from appliance.manifest import Manifest, load_manifest

HERE = Path(__file__).resolve().parent
# Every MR file that pydicom and pydicom-data ship, one per distinct image (the compressed twins of
# these decode to the same pixels, so they would add nothing).
MR_FILES = ("MR_small.dcm", "emri_small.dcm", "MR2_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")
INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


@dataclass(frozen=True)
class Frame:
    """One frame in display units 0..1, with where it came from."""

    name: str
    description: str
    pixels: np.ndarray


def read_frames(name: str) -> list[Frame]:
    """Decode one test file to display frames: modality LUT, then its first window, else min/max."""
    # download=False: the appliance must never fetch anything, and neither must its measurements.
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not in the installed pydicom / pydicom-data test files.")
    ds = pydicom.dcmread(path)
    stack = ds.pixel_array
    stack = stack if int(ds.get("NumberOfFrames", 1)) > 1 else stack[np.newaxis]
    # Where the body part is missing, the study description is the only hint of what was imaged.
    part = str(ds.get("BodyPartExamined", "") or ds.get("StudyDescription", "") or "unknown part").lower()
    frames = []
    for i, raw in enumerate(stack):
        values = apply_modality_lut(raw, ds).astype(np.float64)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            shown = apply_voi_lut(values, ds, index=0)
            # The VOI output range is the one pydicom maps the window onto; find it from the extremes.
            lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0)
        else:
            shown, lo, hi = values, values.min(), values.max()
        display = np.clip((shown - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            display = 1.0 - display
        label = f"{name} frame {i}" if len(stack) > 1 else name
        frames.append(Frame(label, f"{ds.get('Modality', '')} {part}, {raw.shape[1]}x{raw.shape[0]}", display))
    return frames


def preprocess(frame: np.ndarray, manifest: Manifest, interpolation: str | None = None) -> np.ndarray:
    """Stretch-resize, replicate to RGB and normalise as the manifest says (HWC, float32)."""
    spec, pre = manifest.input, manifest.preprocess
    flag = INTERPOLATION[interpolation or pre.interpolation]
    resized = cv2.resize(frame, (spec.width, spec.height), interpolation=flag)
    rgb = np.repeat(resized[:, :, np.newaxis], spec.channels, axis=2)
    lo, hi = pre.scale
    scaled = rgb * (hi - lo) + lo
    return ((scaled - np.array(pre.mean)) / np.array(pre.std)).astype(np.float32)


def time_batches(session: ort.InferenceSession, batch: np.ndarray, repeats: int) -> list[float]:
    """Wall time in ms of each of `repeats` runs, after two warm-up runs."""
    name = session.get_inputs()[0].name
    for _ in range(2):
        session.run(None, {name: batch})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: batch})
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> int:
    """Print per-frame scores and batch-1 / batch-8 latencies as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="Timed runs per batch size.")
    args = parser.parse_args()
    loaded = load_manifest(HERE)
    manifest = loaded.manifest
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    frames = [f for name in MR_FILES for f in read_frames(name)]
    batch = np.stack([preprocess(f.pixels, manifest) for f in frames])
    probs = session.run(None, {manifest.input.name: batch})[0]
    labels = manifest.output.labels
    print("| input | what | top | " + " | ".join(labels) + " |")
    print("| --- | --- | --- | " + " | ".join("---:" for _ in labels) + " |")
    for frame, row in zip(frames, probs, strict=True):
        top = int(np.argmax(row))
        values = " | ".join(f"{v:.3f}" for v in row)
        print(f"| {frame.name} | {frame.description} | {labels[top]} | {values} |")
    print()
    for size in (1, 8):
        times = time_batches(session, batch[:size], args.repeats)
        median = statistics.median(times)
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(
            f"batch {size}: median {median:.0f} ms, p90 {p90:.0f} ms per batch, "
            f"{median / size:.0f} ms per image ({args.repeats} runs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
