"""A write that is whole on disk before anyone is told it is there: a power cut leaves the old file or the new
one, never a torn one, and never a file whose name the folder lost. The one way the appliance writes a file of
its own: private (0600) unless a caller says otherwise, since what it writes holds patient data or secrets."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700
TEMPORARY_SUFFIX = ".tmp"  # a file being written: ".<its name>.<random>.tmp" beside it, removed if it fails


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE_FILE, *, sole_writer: bool = False) -> None:
    """Write ``data`` to ``path`` durably: a temporary file in the same folder, fsync, rename over the target,
    fsync of the folder. Where it fails before the rename, ``path`` is as it was and no temporary file is left.
    ``sole_writer``: as for ``AtomicWriter``."""
    with writing(path, mode, sole_writer=sole_writer) as f:
        f.write(data)


@contextlib.contextmanager
def writing(path: Path, mode: int = PRIVATE_FILE, *, sole_writer: bool = False) -> Iterator[IO[bytes]]:
    """A file to write ``path``'s new content into, put in place as ``write_atomic`` does when the block ends
    without an error; an error removes it instead, and ``path`` is as it was."""
    writer = AtomicWriter(path, mode, sole_writer=sole_writer)
    try:
        yield writer.file
    except BaseException:
        writer.discard()
        raise
    writer.commit()


class AtomicWriter:
    """``path``'s new content, written to ``file`` (at ``temporary``, beside ``path``) and put in place whole by
    ``commit``, or removed by ``discard``: ``writing`` for a writer whose content arrives over several calls (the
    DICOM spool, as a C-STORE arrives). Makes ``path``'s folder (0700) where it is missing.

    ``sole_writer``: nothing else writes ``path`` meanwhile (a lock is held, or the name is the caller's alone),
    so the temporary file's name is fixed (``.<name>.tmp``), and one that a crash left is reused, not left behind.
    Otherwise it is random, made with O_EXCL."""

    def __init__(self, path: Path, mode: int = PRIVATE_FILE, *, sole_writer: bool = False) -> None:
        self.path = path
        path.parent.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        self.file: IO[bytes]
        if sole_writer:
            self.temporary = path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")
            self.file = open(self.temporary, "wb", opener=_no_symlink)  # noqa: SIM115 (closed by commit or discard)
        else:
            # A NamedTemporaryFile: the object pynetdicom writes a data set to (it calls .file.flush(), then
            # unlinks .name once its handler is done).
            self.file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by commit or discard)
                mode="wb", dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, delete=False
            )
            self.temporary = Path(self.file.name)
        try:
            os.fchmod(self.file.fileno(), mode)  # exactly this, whatever the umask of the process that calls
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """fsync, rename over ``path``, fsync of the folder: once this returns, a power cut keeps the content
        and its name. Where the rename fails, the temporary file is removed and ``path`` is as it was."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temporary, self.path)
        except BaseException:
            self.discard()
            raise
        sync_folder(self.path.parent)

    def discard(self) -> None:
        """Close and remove the temporary file (gone already is fine)."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):  # gone, or its folder is
            self.temporary.unlink(missing_ok=True)


def _no_symlink(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, PRIVATE_FILE)


def rename_durably(source: Path, target: Path) -> None:
    """Rename ``source`` over ``target`` (in the same folder) and fsync the folder, so the new name survives."""
    os.replace(source, target)
    sync_folder(target.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder: the names made, renamed or removed in it are on the disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
