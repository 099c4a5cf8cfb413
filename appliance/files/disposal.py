"""What happens to a file once its result is stored: kept, moved to processed/, deleted, or set aside in rejected/."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Literal, Protocol

from appliance.domain.errors import FileRewritten
from appliance.domain.result import Rejection, Result
from appliance.files.durable import PRIVATE_FILE, PRIVATE_FOLDER, write_atomic, writing

log = logging.getLogger(__name__)

COPY_CHUNK = 1024 * 1024  # a copy to another filesystem, read and written this much at a time


class Places(Protocol):
    """Where files go once scored or rejected: the [watch] section says (``appliance.config.WatchConfig``)."""

    @property
    def after_scoring(self) -> Literal["keep", "move", "delete"]: ...
    @property
    def processed_dir(self) -> Path: ...
    @property
    def rejected_dir(self) -> Path: ...


def _unique_target(folder: Path, input_id: int, name: str) -> Path:
    # The journal id makes names unique and traceable; scanners reuse names across studies.
    return folder / f"{input_id:08d}-{name}"


def _move(src: Path, folder: Path, input_id: int) -> Path:
    folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
    target = _unique_target(folder, input_id, src.name)
    try:
        # Link, then unlink: the watched folder sees a delete, not a rename. A rename out of it is an
        # unpaired IN_MOVED_FROM, which watchdog holds back for 0.5 s, stalling every event behind it.
        os.link(src, target)
    except FileExistsError:
        if not os.path.samefile(src, target):  # a crash between link and unlink left the twin there
            raise
    except OSError:  # another filesystem, or one without hard links (SMB, FAT)
        _copy_then_remove(src, target)
        return target
    # A linked file keeps the mode its writer gave it (often 0644): here it holds patient data of ours.
    try:
        target.chmod(PRIVATE_FILE)
    except PermissionError:
        # Another user's file (the scanner's, writable through a shared group): the link would keep its owner
        # and mode, so the appliance keeps a copy of its own instead.
        target.unlink()
        _copy_then_remove(src, target)
        return target
    src.unlink()
    return target


def _copy_then_remove(src: Path, target: Path) -> None:
    # The copy is on the disk, name and all, before the source goes. One the disk could not hold whole is not
    # kept (it is the space needed to retry); the target's name is the input's alone, and one a crash left is
    # reused by the retry.
    # O_NONBLOCK: a FIFO put in the file's place must not block the finisher for good; it is refused.
    with open(os.open(src, os.O_RDONLY | os.O_NONBLOCK), "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        with writing(target, sole_writer=True) as copy:
            shutil.copyfileobj(source, copy, COPY_CHUNK)
    src.unlink()


FOLDER = "folder"  # the one way in whose files are the clinic's; every other way in spools a copy of its own


def spooled(source: str) -> bool:
    """True for an input whose file is the appliance's own copy (Score, and any way in but the folder)."""
    return source != FOLDER


def dispose(src: Path, input_id: int, source: str, result: Result | None, config: Places) -> str:
    """The one disposal policy, for a scored input and for a duplicate of one alike, from its (first)
    result: a rejected file is set aside with its reason (a spooled copy too: its sender may have been
    answered before scoring, as a DICOM sender is, and can send it again only if it is kept); a scored
    spooled copy is deleted; a scored file follows ``after_scoring``. Returns where the file is now ('' when
    gone)."""
    if result is not None and result.rejection is not None:
        if result.rejection.code == FileRewritten.code:  # the scanner's new content: taken again from there
            return str(src)
        return dispose_rejected(src, input_id, result.rejection, config)
    if spooled(source):
        src.unlink(missing_ok=True)
        return ""
    return dispose_scored(src, input_id, config)


def dispose_scored(src: Path, input_id: int, config: Places) -> str:
    """Returns where the file is now ('' when deleted)."""
    if not src.exists():
        return ""
    if config.after_scoring == "keep":
        return str(src)
    if config.after_scoring == "delete":
        src.unlink(missing_ok=True)
        return ""
    return str(_move(src, config.processed_dir, input_id))


def dispose_rejected(src: Path, input_id: int, rejection: Rejection, config: Places) -> str:
    """Move a rejected file aside with a '.reason.txt' beside it, whatever after_scoring says."""
    if not src.exists():
        return ""
    # The reason first: where it cannot be written (a full disk) the file stays in the watch folder and
    # the whole disposal is retried, rather than a rejected file lying there without its reason.
    reason = _unique_target(config.rejected_dir, input_id, src.name + ".reason.txt")
    text = f"input_id: {input_id}\ncode: {rejection.code}\nreason: {rejection.message}\n"
    write_atomic(reason, text.encode(), sole_writer=True)  # replaces one an earlier try left, mode and all
    return str(_move(src, config.rejected_dir, input_id))
