"""Faults that hold the daemon back without stopping it (a full disk, a missing watch folder): one list, fed by
several sources, that health, GetStatus, the log and the intake all read."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.domain.errors import StorageFull

log = logging.getLogger(__name__)

STORAGE = "storage"  # the key of the disk-full fault
WATCH_DIR = "watch_dir"  # the key of the missing-watch-folder fault (appliance.intake.watcher)
# After a write failed for want of space, the fault holds until at least this much more is free than
# when it failed, even where statvfs already shows the low-water mark met (quotas, reserved blocks):
# otherwise the fault would flap between the failing write and the next check.
REGAIN_BYTES = 1 << 20
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC/EDQUOT from the OS, or SQLITE_FULL from the journal, anywhere in the exception's chain."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, StorageFull):
            return True
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


@dataclass(frozen=True)
class _Fault:
    sentence: str
    blocks_intake: bool
    degraded: bool = False  # the daemon serves on another way (a remote backend's local fallback): health holds


class Faults:
    """The problems that hold now, each under its source's key; a problem is logged once when it begins and
    once when it ends, however often its source reports it.

    ``accepting()`` is False while a fault that blocks intake holds (the disk is full): the folder's intake
    leaves new files in the watch folder and Score refuses with ``refusal()``. Listeners (``subscribe``) run
    after every change, in the thread that made it; those of ``on_resume`` once such faults are over, to take
    what waited meanwhile.

    It also watches free space on ``folders`` (the data folder, processed/, rejected/): ``check_storage()``,
    called periodically, sets the disk-full fault below ``min_free_mb`` and clears it above; ``report(error)``
    sets it at once for a write that failed with ENOSPC or SQLITE_FULL.
    """

    def __init__(self, folders: Iterable[Path] = (), min_free_mb: float = 0.0) -> None:
        self._folders = list(dict.fromkeys(folders))
        self._min_free = int(min_free_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._faults: dict[str, _Fault] = {}
        self._seen: dict[str, None] = {}  # every key that ever held, in order (for metrics)
        self._listeners: list[Callable[[], None]] = []
        self._resume_listeners: list[Callable[[], None]] = []
        self._failed_with_free: int | None = None  # free bytes when a write last failed for want of space

    # --- any source -------------------------------------------------------------------------------

    def set(self, key: str, sentence: str, *, blocks_intake: bool = False, degraded: bool = False) -> None:
        """The fault ``key`` holds; logged (ERROR, or WARNING where ``degraded``: served on another way) only when
        it begins. The sentence may be updated meanwhile."""
        with self._lock:
            was_accepting = self._accepting()
            began = key not in self._faults
            self._faults[key] = _Fault(sentence, blocks_intake, degraded)
            self._seen[key] = None
            accepting = self._accepting()
        if began:
            log.log(logging.WARNING if degraded else logging.ERROR, "%s", sentence)
        if began or accepting != was_accepting:
            self._changed(resumed=accepting and not was_accepting)

    def clear(self, key: str, sentence: str) -> None:
        """The fault ``key`` is over; ``sentence`` is logged (WARNING) only when it did hold."""
        with self._lock:
            was_accepting = self._accepting()
            ended = self._faults.pop(key, None) is not None
            accepting = self._accepting()
        if ended:
            log.warning("%s", sentence)
            self._changed(resumed=accepting and not was_accepting)

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._faults

    def kinds(self, seen: bool = False) -> list[str]:
        """The keys of the faults that hold now; with ``seen``, of every fault that held since start."""
        with self._lock:
            return list(self._seen if seen else self._faults)

    def problems(self) -> list[str]:
        """One sentence per fault that holds now, for Status.problems."""
        with self._lock:
            return [f.sentence for f in self._faults.values()]

    def holding_back(self) -> bool:
        """Whether a fault holds that is more than a degradation: health says NOT_SERVING then."""
        with self._lock:
            return any(not f.degraded for f in self._faults.values())

    def accepting(self) -> bool:
        """False while a fault holds that means new inputs could not be stored."""
        with self._lock:
            return self._accepting()

    def _accepting(self) -> bool:
        return not any(f.blocks_intake for f in self._faults.values())

    def refusal(self) -> str | None:
        """The sentence to refuse a new input with while not accepting (gRPC UNAVAILABLE), else None."""
        with self._lock:
            blocking = [f.sentence for f in self._faults.values() if f.blocks_intake]
        return " ".join(blocking) if blocking else None

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener`` runs after every change of the faults that hold, in the thread that made it."""
        self._listeners.append(listener)

    def on_resume(self, listener: Callable[[], None]) -> None:
        """``listener`` runs when the last fault that held new inputs back is over (after the ``subscribe``
        listeners, in the thread that ended it): what waited in the folder meanwhile is taken then."""
        self._resume_listeners.append(listener)

    def _changed(self, resumed: bool) -> None:
        for listener in list(self._listeners) + (list(self._resume_listeners) if resumed else []):
            try:
                listener()
            except Exception:  # a listener must not break the source that reported the fault
                log.exception("a fault listener failed")

    # --- storage ----------------------------------------------------------------------------------

    def report(self, error: BaseException) -> bool:
        """A write failed: True (and the disk-full fault set) when it failed for want of space. The caller
        then keeps what failed for a retry instead of logging it (the fault's one sentence says it all)."""
        if not is_disk_full(error):
            return False
        free = self._least_free()
        with self._lock:
            if self._failed_with_free is None:
                self._failed_with_free = free[1] if free else 0
        where = free[0] if free else None
        self.set(STORAGE, self._full_sentence(where, None), blocks_intake=True)
        return True

    def check_storage(self) -> None:
        """Compare free space with the low-water mark: set, update or clear the disk-full fault."""
        free = self._least_free()
        if free is None:
            return
        where, available = free
        with self._lock:
            failed = self._failed_with_free
            if failed is not None and available >= failed + REGAIN_BYTES:
                self._failed_with_free = failed = None
            holding = STORAGE in self._faults
        # Once below the mark, a little more than the mark is needed to end the fault: free space that hovers
        # at the mark (a log growing, a file moved aside) must not flip health every second.
        mark = self._min_free + (self._min_free // 10 + REGAIN_BYTES if holding else 0)
        if available < mark or failed is not None:
            self.set(STORAGE, self._full_sentence(where, available), blocks_intake=True)
        else:
            mb = available / (1024 * 1024)
            self.clear(STORAGE, f"Space is free again on {where} ({mb:.0f} MB); taking new files and storing results.")

    def _least_free(self) -> tuple[Path, int] | None:
        """The folder with the least space available to us (statvfs f_bavail), and that many bytes."""
        least: tuple[Path, int] | None = None
        for folder in self._folders:
            try:
                st = os.statvfs(folder)
            except OSError:
                continue  # not created yet, or being remounted: the next check sees it
            available = st.f_bavail * st.f_frsize
            if st.f_files and st.f_favail == 0:
                available = 0  # out of inodes: no new file can be written either
            if least is None or available < least[1]:
                least = (folder, available)
        return least

    def _full_sentence(self, where: Path | None, available: int | None) -> str:
        place = f"the disk holding {where}" if where else "the appliance's disk"
        if available is None:
            state = "is full (a write failed: no space left on device)"
        else:
            state = f"is full ({available / (1024 * 1024):.0f} MB free, storage.min_free_mb = {self._min_free >> 20})"
        return (
            f"Storage fault: {place} {state}; new files wait in the watch folder and results are stored "
            "once space is freed."
        )
