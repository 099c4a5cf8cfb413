"""The durable write, on real folders: whole files, private, no temporary file left, and (under strace) the file
and its name on the disk, in that order, before it returns."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.files.durable import AtomicWriter, rename_durably, write_atomic, writing
from tests.syscalls import durable_write, strace, threads


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The umask of a process that makes files 0644 and folders 0755: what the helper makes is private anyway."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_atomic_replaces_the_whole_file_privately(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "new" / "a.json"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary file left
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700


def test_a_mode_asked_for_is_the_mode_made(tmp_path: Path) -> None:
    old = os.umask(0o277)  # stricter than asked: the helper sets the mode itself
    try:
        write_atomic(tmp_path / "shared", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "shared") == 0o640


def test_an_error_while_writing_leaves_the_old_file_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    write_atomic(path, b"old")
    with pytest.raises(RuntimeError), writing(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("the sender went away")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # a folder where the file should go: the rename fails
    (target / "inside").write_bytes(b"kept")
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and (target / "inside").read_bytes() == b"kept"


def test_a_writer_streams_and_commits_or_discards(tmp_path: Path, open_umask: None) -> None:
    kept = AtomicWriter(tmp_path / "kept.dcm")
    assert kept.temporary.parent == tmp_path and kept.temporary.name.startswith(".kept.dcm.")
    for chunk in (b"DICM", b"-one", b"-two"):
        kept.file.write(chunk)
    assert not kept.path.exists()  # nobody sees it before it is whole
    kept.commit()
    assert kept.path.read_bytes() == b"DICM-one-two" and _mode(kept.path) == 0o600
    dropped = AtomicWriter(tmp_path / "dropped.dcm")
    dropped.file.write(b"half")
    dropped.discard()
    dropped.discard()  # twice is fine (an association's end after its handler's refusal)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.dcm"]


def test_a_sole_writer_reuses_the_temporary_file_a_crash_left(tmp_path: Path) -> None:
    leftover = tmp_path / ".marker.tmp"
    leftover.write_bytes(b"a crash's half")
    leftover.chmod(0o644)
    writer = AtomicWriter(tmp_path / "marker", sole_writer=True)
    assert writer.temporary == leftover and _mode(leftover) == 0o600
    writer.file.write(b"whole")
    writer.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["marker"] and (tmp_path / "marker").read_bytes() == b"whole"
    (tmp_path / "elsewhere").write_bytes(b"not ours")
    (tmp_path / ".marker.tmp").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):  # never written through a link
        write_atomic(tmp_path / "marker", b"x", sole_writer=True)
    assert (tmp_path / "elsewhere").read_bytes() == b"not ours" and (tmp_path / "marker").read_bytes() == b"whole"


def test_a_durable_rename_moves_in_one_step(tmp_path: Path) -> None:
    (tmp_path / "new").write_bytes(b"n")
    (tmp_path / "old").write_bytes(b"o")
    rename_durably(tmp_path / "new", tmp_path / "old")
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (tmp_path / "old").read_bytes() == b"n"


@pytest.mark.parametrize("how", ["write_atomic", "writer"])
def test_the_data_and_its_name_are_on_the_disk_before_it_returns(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    write = {
        "write_atomic": "write_atomic(folder / 'a.bin', data)",
        "writer": "w = AtomicWriter(folder / 'a.bin'); w.file.write(data[:3]); w.file.write(data[3:]); w.commit()",
    }[how]
    program = (
        "import sys, time; from pathlib import Path; from appliance.files.durable import AtomicWriter, write_atomic\n"
        f"folder, data = Path(sys.argv[1]), b'0123456789' * 1000\n{write}\nprint(time.time())"
    )
    traces = tmp_path / "strace"
    done = subprocess.run(
        [*strace(traces), "--", sys.executable, "-c", program, str(folder)], capture_output=True, check=True
    )
    returned = float(done.stdout)
    [thread] = [t for t in threads(traces) if any(c.call.startswith("rename") for c in t)]
    writes, _, _, folder_synced = durable_write(thread, os.path.realpath(folder))
    assert sum(c.result for c in writes) == 10_000 and folder_synced.end <= returned
    assert (folder / "a.bin").read_bytes() == b"0123456789" * 1000
