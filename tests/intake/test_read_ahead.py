"""Read-ahead in the decode pool: one read gives the content hash and the tensors, of the screened file only."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from appliance.config import LimitsConfig
from appliance.domain.errors import InputTooLarge
from appliance.domain.manifest import load_manifest
from appliance.files.content_hash import FileChanged, digest_file
from appliance.prepare.pool import PreparePool
from appliance.prepare.preparer import Preparer

from ..integration.conftest import TEST_MODEL, png_bytes


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(TEST_MODEL).manifest


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_one_read_gives_the_hash_and_the_same_tensors_as_the_preparer(tmp_path: Path, manifest, mode) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(7, size=300, bit16=True))
    pool = PreparePool(manifest, LimitsConfig(), 1, mode)  # type: ignore[arg-type]
    try:
        ahead = pool.read_ahead(path, path.lstat(), path.name).result(timeout=60)
    finally:
        pool.close()
    assert ahead.error is None and ahead.prepared is not None
    assert ahead.digest == digest_file(path)
    expected = Preparer(manifest, LimitsConfig()).prepare(path.read_bytes()).tensors
    assert len(ahead.prepared.tensors) == 1 and np.array_equal(ahead.prepared.tensors[0], expected[0])


def test_a_file_rewritten_after_screening_is_not_read_as_if_it_were_the_same(tmp_path: Path, manifest) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(1))
    screened = path.lstat()
    time.sleep(0.01)
    path.write_bytes(png_bytes(2, size=128))
    pool = PreparePool(manifest, LimitsConfig(), 1, "threads")
    try:
        with pytest.raises(FileChanged, match="changed since it was screened"):
            pool.read_ahead(path, screened, path.name).result(timeout=60)
    finally:
        pool.close()


def test_a_file_past_the_size_limit_is_hashed_but_never_held(tmp_path: Path, manifest) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 3 * 2**20)
    pool = PreparePool(manifest, LimitsConfig(max_file_mb=1), 1, "threads")
    try:
        ahead = pool.read_ahead(path, path.lstat(), path.name).result(timeout=60)
    finally:
        pool.close()
    assert ahead.prepared is None and isinstance(ahead.error, InputTooLarge)
    assert ahead.digest == digest_file(path)
