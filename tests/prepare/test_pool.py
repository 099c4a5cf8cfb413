"""The decode pool's workers: one that ran out of memory is replaced, one that never answers is ended, and
closing never waits on one."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.config import LimitsConfig
from appliance.domain.errors import InputRejected
from appliance.domain.manifest import load_manifest
from appliance.prepare.pool import PreparePool
from bench.daemon_run import process_tree
from tests.imaging import hostile

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"


def _png(folder: Path, seed: int) -> Path:
    path = folder / f"good-{seed}.png"
    image = (np.random.default_rng(seed).random((64, 64)) * 255).astype(np.uint8)
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    return path


def _heavy(folder: Path) -> Path:
    """80 Mpixel of 16-bit native pixels: its decode needs well over 400 MiB."""
    ds = hostile.image_header(8944, 8944, None, BitsStored=12, HighBit=11)
    ds.PixelData = (np.arange(8944 * 8944, dtype=np.uint32) % 4093).astype(np.uint16).tobytes()
    path = folder / "heavy.dcm"
    path.write_bytes(hostile.save(ds))
    return path


def _workers() -> set[int]:
    """This process's decode workers: the forkserver's children."""
    tree = process_tree(os.getpid())
    forkservers = {p for p in tree if _parent(p) == os.getpid()}
    return {p for p in tree if _parent(p) in forkservers}


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _rejection(future: Future[object]) -> InputRejected:
    with pytest.raises(InputRejected) as err:
        future.result(timeout=120)
    return err.value


def test_a_worker_that_ran_out_of_memory_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    heavy, good = _heavy(tmp_path), [_png(tmp_path, seed) for seed in range(4)]
    pool = PreparePool(load_manifest(MODEL).manifest, LimitsConfig(worker_memory_mb=400), workers=2)
    try:
        pool.warm()
        before = _workers()
        assert len(before) == 2
        with caplog.at_level(logging.WARNING, logger="appliance.prepare.pool"):
            assert _rejection(pool.prepare(heavy, heavy.name)).code == "decode_out_of_memory"
            for path in good:
                assert pool.prepare(path, path.name).result(timeout=60).tensors
        assert "a decode worker ran out of memory or kept too much of it; the workers are replaced" in caplog.text
        # The files after it ran in fresh workers, and the old ones left (their memory with them).
        assert _workers().isdisjoint(before)
    finally:
        pool.close()


def test_a_worker_that_never_answers_is_ended_and_its_input_rejected(tmp_path: Path) -> None:
    """A FIFO in place of a journaled file: opening it waits for a writer in the kernel, where the worker's
    SIGALRM is not armed; only the pool's watch ends it."""
    fifo = tmp_path / "queued.dcm"
    os.mkfifo(fifo)
    good = [_png(tmp_path, seed) for seed in range(3)]
    pool = PreparePool(load_manifest(MODEL).manifest, LimitsConfig(decode_timeout_s=0.2), workers=2)
    try:
        pool.warm()
        wedged = pool.prepare(fifo, fifo.name)
        futures = [pool.prepare(p, p.name) for p in good]
        error = _rejection(wedged)
        assert error.code == "decode_timeout", error.message
        assert all(f.result(timeout=60).tensors for f in futures)
        assert pool.prepare(good[0], good[0].name).result(timeout=60).tensors
    finally:
        pool.close()


def test_closing_ends_a_worker_that_never_answers(tmp_path: Path) -> None:
    fifo = tmp_path / "queued.dcm"
    os.mkfifo(fifo)
    pool = PreparePool(load_manifest(MODEL).manifest, LimitsConfig(), workers=1)
    pool.warm()
    wedged = pool.prepare(fifo, fifo.name)
    (worker,) = _workers()
    _until(lambda: _waiting_for_a_writer(worker))  # wedged, not merely queued (queued ones are just cancelled)
    pool.close()
    assert wedged.cancelled()  # the input stays queued in the journal for the next start
    _until(lambda: not _alive(worker))


def _waiting_for_a_writer(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"  # in open() of a FIFO
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within 30 s"
        time.sleep(0.05)
