"""The spool: the appliance's own copy of an input it was sent (a Score upload, a scanner's C-STORE), kept until
scored. A copy is on the disk, its bytes and its name, and closed to other users, before its sender is answered:
a power cut after the answer loses nothing the sender was told was taken."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

from appliance.files.durable import PRIVATE_FOLDER, AtomicWriter, sync_folder, write_atomic


def prepare(folder: Path) -> None:
    """Make the spool folder (0700), its entry in its parent on the disk too."""
    if folder.is_dir():
        return
    folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
    sync_folder(folder.parent)


def place(folder: Path, source: str, suffix: str) -> Path:
    """A new copy's name: the way in it came by, then 128 random bits (never a name its sender chose)."""
    return folder / f"{source}-{uuid.uuid4().hex}{suffix}"


def keep(folder: Path, source: str, data: bytes, suffix: str) -> Path:
    """A copy of ``data`` in the spool, on the disk when this returns (0600); OSError where it cannot be, and
    then nothing of it is left."""
    path = place(folder, source, suffix)
    try:
        write_atomic(path, data)
    except BaseException:
        with contextlib.suppress(OSError):  # renamed, but its folder's fsync failed: not kept, so not left either
            path.unlink(missing_ok=True)
        raise
    return path


def receive(folder: Path, source: str, suffix: str) -> AtomicWriter:
    """A copy written as it arrives: ``commit`` puts it in place as ``keep`` does, ``discard`` drops it."""
    return AtomicWriter(place(folder, source, suffix))


def drop_unjournaled(folder: Path, journaled: set[str | None]) -> None:
    """At start: copies spooled but never journaled (a crash in between) were never acknowledged, and their
    senders send them again, so they go."""
    for path in folder.glob("*"):
        if str(path) not in journaled:
            path.unlink(missing_ok=True)
