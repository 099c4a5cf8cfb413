"""A file from the watched folder is prepared only as the file that was hashed and journaled: its tensors are the
Preparer's, a rewrite since is refused (file_changed), times set after closing are not a rewrite."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.config import LimitsConfig
from appliance.domain.errors import FileRewritten, InputTooLarge
from appliance.domain.manifest import load_manifest
from appliance.files.content_hash import digest_file
from appliance.prepare.pool import PreparePool, Screened
from appliance.prepare.preparer import Preparer

from ..integration.conftest import TEST_MODEL, png_bytes


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(TEST_MODEL).manifest


def _screened(path: Path) -> Screened:
    st = path.lstat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_the_screened_file_gives_the_same_tensors_as_the_preparer(tmp_path: Path, manifest, mode) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(7, size=300, bit16=True))
    pool = PreparePool(manifest, LimitsConfig(), 1, mode)  # type: ignore[arg-type]
    try:
        prepared = pool.prepare(path, path.name, _screened(path), digest_file(path)).result(timeout=60)
    finally:
        pool.close()
    expected = Preparer(manifest, LimitsConfig()).prepare(path.read_bytes()).tensors
    assert len(prepared.tensors) == 1 and np.array_equal(prepared.tensors[0], expected[0])


def test_a_file_rewritten_after_screening_is_not_read_as_if_it_were_the_same(tmp_path: Path, manifest) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(1))
    screened, digest = _screened(path), digest_file(path)
    time.sleep(0.01)
    path.write_bytes(png_bytes(2, size=128))
    pool = PreparePool(manifest, LimitsConfig(), 1, "threads")
    try:
        with pytest.raises(FileRewritten) as refused:
            pool.prepare(path, path.name, screened, digest).result(timeout=60)
    finally:
        pool.close()
    assert refused.value.code == "file_changed"


def test_times_set_after_closing_are_not_a_rewrite(tmp_path: Path, manifest) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(3))
    screened, digest = _screened(path), digest_file(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # as `cp -p` does once the bytes are in
    pool = PreparePool(manifest, LimitsConfig(), 1, "threads")
    try:
        prepared = pool.prepare(path, path.name, screened, digest).result(timeout=60)
    finally:
        pool.close()
    assert len(prepared.tensors) == 1


def test_a_file_past_the_size_limit_is_hashed_but_never_held(tmp_path: Path, manifest) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 3 * 2**20)
    digest = digest_file(path)  # streamed: the folder's intake hashes any size
    pool = PreparePool(manifest, LimitsConfig(max_file_mb=1), 1, "threads")
    try:
        with pytest.raises(InputTooLarge):
            pool.prepare(path, path.name, _screened(path), digest).result(timeout=60)
    finally:
        pool.close()


def test_a_file_rewritten_past_the_size_limit_is_refused_as_rewritten_not_too_large(tmp_path: Path, manifest) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(4))
    screened, digest = _screened(path), digest_file(path)
    path.write_bytes(b"\0" * 3 * 2**20)  # too large now: the journaled bytes are what must not be blamed
    pool = PreparePool(manifest, LimitsConfig(max_file_mb=1), 1, "threads")
    try:
        with pytest.raises(FileRewritten):
            pool.prepare(path, path.name, screened, digest).result(timeout=60)
    finally:
        pool.close()
