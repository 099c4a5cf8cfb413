"""Stages alone, on the same inputs: decode+preprocess on the whole host (threads, processes), and the
loop a clinic would write by hand (the baseline the daemon's speed-up is measured against)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from appliance.toolkit import LimitsConfig, Manifest, init_worker, prepare_file, worker_initargs


def prepare_throughput(
    manifest: Manifest, limits: LimitsConfig, paths: Sequence[Path], kind: str, workers: int | None = None
) -> float:
    """Files per second through decode + preprocess alone, with `workers` threads or processes."""
    workers = workers or os.cpu_count() or 1
    initargs = worker_initargs(manifest, limits, kind == "process")  # the daemon's worker set-up and task
    pool: Executor
    if kind == "process":
        pool = ProcessPoolExecutor(workers, initializer=init_worker, initargs=initargs)
    else:
        init_worker(*initargs)
        pool = ThreadPoolExecutor(workers)
    files, names = [str(p) for p in paths], [p.name for p in paths]
    with pool:
        list(pool.map(prepare_file, files[: 2 * workers], names))  # warm up (imports, pools, first decodes)
        start = time.perf_counter()
        list(pool.map(prepare_file, files, names))
        return len(paths) / (time.perf_counter() - start)


def naive_loop(manifest: Manifest, onnx_path: Path, paths: Sequence[Path]) -> float:
    """One file at a time, by hand: pydicom pixel_array, modality and VOI LUT at full resolution in float,
    OpenCV resize, ONNX Runtime FP32 at batch 1. Returns files per second."""
    spec, pp = manifest.input, manifest.preprocess
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])  # its defaults
    input_name = session.get_inputs()[0].name
    lo, hi = pp.scale
    mean, std = np.float32(pp.mean[0]), np.float32(pp.std[0])
    start = time.perf_counter()
    for path in paths:
        if path.suffix == ".png":
            image = np.asarray(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), dtype=np.float64) / 65535.0
        else:
            ds = pydicom.dcmread(path)
            values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
            image = (values - values.min()) / max(float(values.max() - values.min()), 1e-9)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                image = 1.0 - image
        small = cv2.resize(image.astype(np.float32), (spec.width, spec.height), interpolation=cv2.INTER_AREA)
        x = (small * (hi - lo) + lo - mean) / std
        x = np.repeat(x[..., None], spec.channels, axis=2)
        x = x.transpose(2, 0, 1) if spec.layout == "NCHW" else x
        session.run(None, {input_name: x[None].astype(np.float32)})
    return len(paths) / (time.perf_counter() - start)
