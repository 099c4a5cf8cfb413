"""The content hash is taken of the very file that was screened, and never blocks on a FIFO."""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3
import pytest

from appliance.files.content_hash import FileChanged, digest_file


def test_hash_of_the_screened_file(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x" * 3_000_000)
    assert digest_file(path, path.lstat()) == blake3.blake3(b"x" * 3_000_000).hexdigest()


def test_a_file_rewritten_after_screening_is_not_hashed_as_if_it_were_the_same(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"first")
    screened = path.lstat()
    time.sleep(0.01)
    path.write_bytes(b"second, longer")
    with pytest.raises(FileChanged, match="changed since it was screened"):
        digest_file(path, screened)


def test_a_fifo_swapped_in_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    os.mkfifo(path)  # no writer: a blocking open would hang for good
    with pytest.raises(FileChanged, match="not a regular file"):
        digest_file(path)
