"""Realistic benchmark inputs, generated: the two workloads of `make bench`.

- mr: 16-bit MR slices as DICOM (256 and 512 px, a window in the header, a quarter RLE-compressed)
  and a quarter as 16-bit PNG.
- radiograph: full-size 12-bit CR/DX DICOM (about 2048 x 2500, uncompressed), MONOCHROME1 and
  MONOCHROME2 mixed, each with its window: the case where decoding, not the model, is the work.
Contents are smooth anatomy-like fields plus noise, different for every file (so no two are duplicates).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

WORKLOADS = ("mr", "radiograph")


def _field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """0..1 float32: a few soft blobs and a gradient on a coarse grid, enlarged, with fine noise."""
    coarse = rng.random((max(2, height // 64), max(2, width // 64))).astype(np.float32)
    yy, xx = np.mgrid[0 : coarse.shape[0], 0 : coarse.shape[1]].astype(np.float32)
    coarse += 0.5 * np.sin(xx / rng.uniform(1.5, 4)) * np.cos(yy / rng.uniform(1.5, 4))
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 0.05, (height, width)).astype(np.float32)
    img -= img.min()
    return img / max(float(img.max()), 1e-6)


def _dicom(pixels: np.ndarray, *, modality: str, photometric: str, bits: int, window: tuple[float, float]) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = "BENCH"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_inputs(folder: Path, workload: str, count: int, seed: int = 7) -> list[Path]:
    """Write `count` files into folder (created); returns their paths in a fixed order."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r} (one of {', '.join(WORKLOADS)})")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        if workload == "mr":
            size = 256 if i % 2 == 0 else 512
            values = np.round(_field(rng, size, size) * rng.uniform(1500, 4000))
            if i % 4 == 3:
                path = folder / f"mr-{i:05d}.png"
                cv2.imwrite(str(path), (values * (65535 / values.max())).astype(np.uint16))
            else:
                center = float(values.mean())
                ds = _dicom(values, modality="MR", photometric="MONOCHROME2", bits=16, window=(center, 2 * center))
                if i % 4 == 1:
                    ds.compress(RLELossless)
                path = folder / f"mr-{i:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
        else:
            height, width = int(rng.integers(2000, 2100)), int(rng.integers(2400, 2560))
            values = np.round(_field(rng, height, width) * 4095)
            mono1 = i % 2 == 1
            if mono1:
                values = 4095 - values
            modality = "CR" if i % 3 else "DX"
            ds = _dicom(values, modality=modality, photometric="MONOCHROME1" if mono1 else "MONOCHROME2", bits=12,
                        window=(2048.0 + rng.uniform(-300, 300), float(rng.uniform(2500, 4000))))  # fmt: skip
            path = folder / f"{modality.lower()}-{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
