"""The decode pool's workers: one that ran out of memory is replaced, one that never answers is ended, one
killed while answering costs no input, closing never waits on one, and a FIFO in place of an input never blocks
one."""

from __future__ import annotations

import functools
import logging
import multiprocessing.connection
import os
import signal
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.config import LimitsConfig
from appliance.domain.errors import InputRejected
from appliance.domain.manifest import load_manifest
from appliance.prepare import pool as pool_module
from appliance.prepare.pool import NOT_A_FILE, Mode, PreparePool
from tests.imaging import hostile
from tests.processes import alive, decode_workers
from tests.waiting import eventually

MODEL = Path(__file__).resolve().parents[2] / "models" / "pipeline-test"


def _heavy(folder: Path) -> Path:
    """80 Mpixel of 16-bit native pixels: its decode needs well over 400 MiB."""
    ds = hostile.image_header(8944, 8944, None, BitsStored=12, HighBit=11)
    ds.PixelData = (np.arange(8944 * 8944, dtype=np.uint32) % 4093).astype(np.uint16).tobytes()
    path = folder / "heavy.dcm"
    path.write_bytes(hostile.save(ds))
    return path


def _workers() -> set[int]:
    """This process's decode workers."""
    return decode_workers(os.getpid())


def _rejection(future: Future[object]) -> InputRejected:
    with pytest.raises(InputRejected) as err:
        future.result(timeout=120)
    return err.value


def test_a_worker_that_ran_out_of_memory_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    heavy, good = _heavy(tmp_path), [hostile.good_png(tmp_path, seed) for seed in range(4)]
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


@pytest.mark.slow  # waits out the worker's time limit, three times
def test_a_worker_that_never_answers_is_ended_and_its_input_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped worker answers nothing but SIGKILL, as one wedged in native code or in the kernel: only the
    pool's watch ends it. Its input is tried alone, and rejected once it has wedged two lone workers too; the
    inputs held up behind it are scored."""
    monkeypatch.setattr(pool_module, "STUCK_MARGIN_S", 3.0)  # judged wedged after 4 s, not 11 s, each time
    wedges = tmp_path / "wedges"
    wedges.mkdir()
    monkeypatch.setattr(pool_module, "init_worker", functools.partial(_init_then_wedge_once_armed, str(wedges)))
    wedging, *good = [hostile.good_png(tmp_path, seed) for seed in range(4)]
    pool = PreparePool(load_manifest(MODEL).manifest, LimitsConfig(decode_timeout_s=0.2), workers=1)
    try:
        pool.warm()
        (worker,) = _workers()
        (wedges / "armed").touch()  # the wedging input's two lone workers stop as they start
        os.kill(worker, signal.SIGSTOP)
        wedged = pool.prepare(wedging, wedging.name)
        futures = [pool.prepare(p, p.name) for p in good]
        error = _rejection(wedged)
        assert error.code == "decode_timeout", error.message
        assert "twice; its workers were ended" in error.message  # the watch's, not the worker's own SIGALRM
        assert sorted(path.name for path in wedges.iterdir()) == ["1", "2", "armed"]
        assert all(f.result(timeout=60).tensors for f in futures)
        assert pool.prepare(good[0], good[0].name).result(timeout=60).tensors
    finally:
        pool.close()


def test_a_worker_killed_while_answering_costs_no_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 (the OOM killer, an admin) can land while a worker writes its answer: the executor then reads the
    rest of that answer for good, blind to the death, and the other worker waits on the pipe's lock the dead one
    held (multiprocessing's docs warn of a queue a killed process was using). The pool's watch ends such a pool,
    and each input it held is prepared alone. Before, a make test run lost 22 of 40 files so."""
    cuts = tmp_path / "cuts"
    cuts.mkdir()
    paths = [hostile.good_png(tmp_path, seed) for seed in range(6)]
    monkeypatch.setattr(pool_module, "init_worker", functools.partial(_init_then_cut_answer_once_armed, str(cuts)))
    pool = PreparePool(load_manifest(MODEL).manifest, LimitsConfig(), workers=2)
    try:
        pool.warm()
        (cuts / "armed").touch()
        with caplog.at_level(logging.ERROR, logger="appliance.prepare.pool"):
            futures = [pool.prepare(path, path.name) for path in paths]
            assert all(f.result(timeout=60).tensors for f in futures)
        assert sorted(path.name for path in cuts.iterdir()) == ["armed", "cut"]  # one answer was cut off
        assert "a decode worker process died while answering" in caplog.text
        assert "each input it held is tried again alone" in caplog.text
        assert pool.prepare(paths[0], paths[0].name).result(timeout=60).tensors  # the renewed pool
    finally:
        pool.close()


def test_closing_ends_a_worker_that_never_answers(tmp_path: Path) -> None:
    """Whether the stopped worker was handed the input or not, closing ends it and the input is cancelled."""
    path = hostile.good_png(tmp_path, 0)
    pool = PreparePool(load_manifest(MODEL).manifest, LimitsConfig(), workers=1)
    pool.warm()
    (worker,) = _workers()
    os.kill(worker, signal.SIGSTOP)
    wedged = pool.prepare(path, path.name)
    pool.close()
    assert wedged.cancelled()  # the input stays queued in the journal for the next start
    eventually(lambda: not alive(worker), "the wedged worker ended", timeout=30)


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_a_fifo_in_place_of_a_queued_input_is_refused_at_once(tmp_path: Path, mode: Mode) -> None:
    """Opening a FIFO for reading waits for a writer, in the kernel: nothing would end it in a thread, and in a
    process only the watch, after minutes. It is refused as soon as it is opened; the pool goes on."""
    fifo = tmp_path / "queued.dcm"
    os.mkfifo(fifo)
    good = hostile.good_png(tmp_path, 1)
    pool = PreparePool(load_manifest(MODEL).manifest, LimitsConfig(), workers=1, mode=mode)
    try:
        error = _rejection(pool.prepare(fifo, fifo.name))
        assert (error.code, error.message) == ("file_vanished", NOT_A_FILE)
        assert pool.prepare(good, good.name).result(timeout=60).tensors
    finally:
        pool.close()


def _init_then_wedge_once_armed(wedges: str, *args: Any) -> None:
    """A decode worker's `init_worker`, then, in the first two workers that start once ``wedges``/armed exists,
    SIGSTOP: wedged as it starts, before it takes its call (each claims a slot file, so it is two across
    processes). Runs in the worker, where `pool_module.init_worker` is the pool's own."""
    pool_module.init_worker(*args)
    folder = Path(wedges)
    if not (folder / "armed").exists():
        return
    if any(_claim(folder / slot) for slot in ("1", "2")):
        os.kill(os.getpid(), signal.SIGSTOP)


def _init_then_cut_answer_once_armed(cuts: str, *args: Any) -> None:
    """A decode worker's `init_worker`, then: the first answer any worker sends once ``cuts``/armed exists is
    written half-way, and its worker kills itself (claiming ``cuts``/cut, so it is one across processes). Runs
    in the worker: the pipe's writer is patched there only."""
    pool_module.init_worker(*args)
    folder = Path(cuts)
    send = multiprocessing.connection.Connection._send

    def cut_off(self: multiprocessing.connection.Connection, buf: bytes) -> None:
        if (folder / "armed").exists() and _claim(folder / "cut"):
            send(self, buf[: max(len(buf) // 2, 1)])
            os.kill(os.getpid(), signal.SIGKILL)
        return send(self, buf)

    multiprocessing.connection.Connection._send = cut_off  # type: ignore[method-assign]


def _claim(slot: Path) -> bool:
    """Create ``slot`` unless it exists: one process across all the workers gets it."""
    try:
        os.close(os.open(slot, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
