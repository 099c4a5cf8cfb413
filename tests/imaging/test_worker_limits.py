"""Decode worker processes under their memory cap and time limit: the file is rejected, nothing else is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import LimitsConfig
from appliance.domain.errors import InputRejected
from appliance.domain.manifest import load_manifest
from appliance.prepare.pool import PreparePool

from . import hostile

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"


def _dicom(folder: Path, name: str, rows: int, cols: int, frames: int | None) -> Path:
    ds = hostile.image_header(rows, cols, frames, BitsStored=12, HighBit=11)
    count = rows * cols * (frames or 1)
    ds.PixelData = (np.arange(count, dtype=np.uint32) % 4093).astype(np.uint16).tobytes()
    path = folder / name
    path.write_bytes(hostile.save(ds))
    return path


@pytest.mark.parametrize(
    ("limits", "rows", "cols", "frames", "code"),
    [
        # 80 Mpixel: its decode needs well over 400 MiB; the other files need a few.
        (LimitsConfig(worker_memory_mb=400), 8944, 8944, None, "decode_out_of_memory"),
        # 512 frames: about 0.6 s of decoding and preprocessing here; a small PNG takes 2 ms.
        (LimitsConfig(decode_timeout_s=0.2), 512, 512, 512, "decode_timeout"),
    ],
    ids=["memory", "time"],
)
def test_a_file_past_a_worker_limit_is_rejected_and_the_others_are_prepared(
    tmp_path: Path, limits: LimitsConfig, rows: int, cols: int, frames: int | None, code: str
) -> None:
    heavy = _dicom(tmp_path, "heavy.dcm", rows, cols, frames)
    good = [hostile.good_png(tmp_path, seed) for seed in range(6)]
    pool = PreparePool(load_manifest(MODEL).manifest, limits, workers=2)
    try:
        pool.warm()
        futures = [pool.prepare(p, p.name) for p in good[:3]]
        heavy_future = pool.prepare(heavy, heavy.name)
        futures += [pool.prepare(p, p.name) for p in good[3:]]
        with pytest.raises(InputRejected) as err:
            heavy_future.result(timeout=60)
        assert err.value.code == code, err.value.message
        for future in futures:
            assert future.result(timeout=60).tensors
        # The worker that refused it goes on: the same pool prepares more.
        assert pool.prepare(good[0], good[0].name).result(timeout=60).tensors
    finally:
        pool.close()
