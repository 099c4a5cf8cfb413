"""The spool, on a real folder: private copies under names of their own, whole or not there at all."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.files import spool


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A spool made under the umask of a process that makes files 0644 and folders 0755."""
    old = os.umask(0o022)
    folder = tmp_path / "data" / "spool"
    spool.prepare(folder)
    yield folder
    os.umask(old)


def test_the_spool_folder_is_private(folder: Path) -> None:
    assert _mode(folder) == 0o700
    spool.prepare(folder)  # again, at the next start: nothing changes
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_kept_copy_is_whole_private_and_named_by_the_appliance(folder: Path) -> None:
    first = spool.keep(folder, "grpc", b"image bytes", ".bin")
    second = spool.keep(folder, "grpc", b"image bytes", ".bin")
    assert first != second  # the same bytes sent twice are two copies until the journal says otherwise
    for path in (first, second):
        assert path.parent == folder and re.fullmatch(r"grpc-[0-9a-f]{32}\.bin", path.name)
        assert path.read_bytes() == b"image bytes" and _mode(path) == 0o600
    assert sorted(folder.iterdir()) == sorted([first, second])  # no temporary file left


def test_a_copy_that_cannot_be_kept_leaves_nothing(tmp_path: Path) -> None:
    blocked = tmp_path / "spool"
    blocked.write_bytes(b"a file where the folder should be")
    with pytest.raises(OSError):
        spool.keep(blocked, "grpc", b"image bytes", ".bin")
    assert [p.name for p in tmp_path.iterdir()] == ["spool"]


def test_a_received_copy_is_in_place_only_once_committed(folder: Path) -> None:
    writer = spool.receive(folder, "dicom", ".dcm")
    assert re.fullmatch(r"dicom-[0-9a-f]{32}\.dcm", writer.path.name) and writer.path.parent == folder
    writer.file.write(b"DICM")
    writer.file.write(b" and the rest")
    assert [p.name for p in folder.iterdir()] == [writer.temporary.name]  # arriving: not yet a copy
    writer.commit()
    assert list(folder.iterdir()) == [writer.path] and writer.path.read_bytes() == b"DICM and the rest"
    assert _mode(writer.path) == 0o600
    dropped = spool.receive(folder, "dicom", ".dcm")
    dropped.file.write(b"half")
    dropped.discard()
    assert list(folder.iterdir()) == [writer.path]
