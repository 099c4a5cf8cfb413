"""Run the VGG16 model on pydicom's offline MR test files through the appliance's own decode and
preprocessing code, and time it: the figures in MODEL_CARD.md."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from appliance.config import InferenceConfig, LimitsConfig
from appliance.domain.manifest import load_manifest
from appliance.inference.backend import Backend
from appliance.inference.loader import open_backend
from appliance.prepare.preparer import Preparer

HERE = Path(__file__).resolve().parent
# Every MR file that pydicom and pydicom-data ship, one per distinct image (the compressed twins of
# these decode to the same pixels, so they would add nothing).
MR_FILES = ("MR_small.dcm", "emri_small.dcm", "MR2_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")


def time_batches(backend: Backend, batch: np.ndarray, repeats: int) -> list[float]:
    """Wall time in ms of each of `repeats` runs, after two warm-up runs."""
    for _ in range(2):
        backend.infer(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.infer(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> int:
    """Print per-frame scores and batch-1 / batch-8 latencies as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="Timed runs per batch size.")
    args = parser.parse_args()
    loaded = load_manifest(HERE)
    labels = loaded.manifest.output.labels
    preparer = Preparer(loaded.manifest, LimitsConfig())
    backend = open_backend(loaded, InferenceConfig())
    names, what, samples = [], [], []
    for name in MR_FILES:
        # download=False: the appliance must never fetch anything, and neither must its measurements.
        path = get_testdata_file(name, download=False)
        if path is None:
            raise FileNotFoundError(f"{name} is not in the installed pydicom / pydicom-data test files.")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        # Where the body part is missing, the study description is the only hint of what was imaged.
        part = str(ds.get("BodyPartExamined", "") or ds.get("StudyDescription", "") or "unknown part").lower()
        prepared = preparer.prepare(Path(str(path)).read_bytes(), name)
        for i, tensor in enumerate(prepared.tensors):
            names.append(f"{name} frame {i}" if len(prepared.tensors) > 1 else name)
            what.append(f"{ds.get('Modality', '')} {part}, {ds.Columns}x{ds.Rows}")
            samples.append(tensor)
    batch = np.stack(samples)
    probs = np.concatenate(
        [backend.infer(batch[i : i + backend.max_batch]) for i in range(0, len(batch), backend.max_batch)]
    )
    print("| input | what | top | " + " | ".join(labels) + " |")
    print("| --- | --- | --- | " + " | ".join("---:" for _ in labels) + " |")
    for name, description, row in zip(names, what, probs, strict=True):
        values = " | ".join(f"{v:.3f}" for v in row)
        print(f"| {name} | {description} | {labels[int(np.argmax(row))]} | {values} |")
    print()
    for size in (1, 8):
        times = time_batches(backend, batch[:size], args.repeats)
        median = statistics.median(times)
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(
            f"batch {size}: median {median:.0f} ms, p90 {p90:.0f} ms per batch, "
            f"{median / size:.0f} ms per image ({args.repeats} runs)"
        )
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
