"""The fault list (appliance.domain.faults) and the scoring stages' retry of results that found the disk full."""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from appliance.api.metrics import Metrics
from appliance.domain.errors import StorageFull
from appliance.domain.faults import STORAGE, Faults, is_disk_full
from appliance.domain.manifest import load_manifest
from appliance.domain.result import InputFacts, Result
from appliance.inference.loader import open_backend
from appliance.journal.journal import Journal
from appliance.scoring.stages import ScoringStages
from tests.in_process import in_process_config
from tests.waiting import eventually

from .integration.conftest import TEST_MODEL, png_bytes


def test_disk_full_is_recognised_in_every_form_it_takes() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(_sqlite_full())
    assert is_disk_full(StorageFull())
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(ValueError("no"))


def test_a_fault_is_logged_once_when_it_begins_and_once_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    faults = Faults()
    changes: list[list[str]] = []
    faults.subscribe(lambda: changes.append(faults.problems()))
    caplog.set_level(logging.INFO, logger="appliance.domain.faults")
    for free in (3, 2, 1):  # reported again and again, its sentence updated: one line
        faults.set("disk", f"The disk is full ({free} MB free).", blocks_intake=True)
    faults.set("folder", "The watch folder is missing.")
    assert faults.problems() == ["The disk is full (1 MB free).", "The watch folder is missing."]
    assert not faults.accepting()
    assert faults.refusal() == "The disk is full (1 MB free)."
    faults.clear("disk", "Space is back.")
    faults.clear("disk", "Space is back.")
    assert faults.accepting() and faults.refusal() is None
    assert faults.problems() == ["The watch folder is missing."]
    assert faults.kinds() == ["folder"] and faults.kinds(seen=True) == ["disk", "folder"]
    assert [r.getMessage() for r in caplog.records] == [
        "The disk is full (3 MB free).",
        "The watch folder is missing.",
        "Space is back.",
    ]
    assert len(changes) == 3


def test_free_space_below_the_low_water_mark_holds_intake_until_it_is_back(tmp_path: Path) -> None:
    faults = Faults([tmp_path], min_free_mb=1 << 40)  # more than any disk: below the mark
    faults.check_storage()
    assert faults.holds(STORAGE) and not faults.accepting()
    assert faults.problems()[0].startswith(f"Storage fault: the disk holding {tmp_path} is full")
    faults._min_free = 0
    faults.check_storage()
    assert not faults.holds(STORAGE) and faults.accepting()


def test_after_a_failed_write_the_fault_holds_until_space_was_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    free = [(Path("/data"), 500 << 20)]  # statvfs says plenty (reserved blocks, a quota): the write knows better
    faults = Faults([Path("/data")], min_free_mb=256)
    monkeypatch.setattr(faults, "_least_free", lambda: free[0])
    assert faults.report(OSError(errno.ENOSPC, "No space left on device"))
    faults.check_storage()
    assert faults.holds(STORAGE), "a check right after the failed write must not end the fault"
    free[0] = (Path("/data"), 600 << 20)
    faults.check_storage()
    assert not faults.holds(STORAGE)
    assert not faults.report(OSError(errno.EACCES, "Permission denied"))
    assert not faults.holds(STORAGE)


# --- the scoring stages: a result that finds the disk full is held and stored later, never dropped -------------


def _sqlite_full() -> sqlite3.OperationalError:
    """What SQLite raises when a write finds the disk full (its error code is what counts, not the text)."""
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL
    return error


class _FullJournal(Journal):
    """A real journal whose result writes fail like SQLite's on a full disk while ``full`` is set."""

    full = False

    def complete_many(self, items: Any) -> list[list[int]]:
        if self.full:
            raise _sqlite_full()
        return super().complete_many(items)


@pytest.fixture
def stages(tmp_path: Path) -> Iterator[tuple[ScoringStages, _FullJournal, Faults, Path]]:
    config = in_process_config(tmp_path)
    loaded = load_manifest(TEST_MODEL)
    backend = open_backend(loaded, config.inference, config.model.engines_dir)
    journal = _FullJournal(tmp_path / "data" / "journal.sqlite3")
    faults = Faults()
    scoring = ScoringStages(config, loaded.manifest, backend, journal, Metrics(), faults=faults)
    scoring.start()
    try:
        yield scoring, journal, faults, config.watch.dir
    finally:
        scoring.stop(timeout=10)
        backend.close()
        journal.close()


def _submit(scoring: ScoringStages, journal: Journal, folder: Path, seed: int) -> tuple[int, Future[list[Result]]]:
    path = folder / f"{seed}.png"
    path.write_bytes(png_bytes(seed))
    reg = journal.register(
        source="folder", path=str(path), file_name=path.name, size=1, mtime_ns=1, content_hash=f"hash-{seed}"
    )
    facts = InputFacts(input_id=reg.input.id, source="folder", file_name=path.name, content_hash=f"hash-{seed}")
    return reg.input.id, scoring.submit(facts, path)


def test_a_result_that_found_the_disk_full_is_stored_once_space_returns(stages) -> None:
    scoring, journal, faults, folder = stages
    journal.full = True
    input_id, future = _submit(scoring, journal, folder, 1)
    with pytest.raises(StorageFull):  # a Score caller is answered at once, with one sentence
        future.result(timeout=60)
    assert faults.holds(STORAGE)
    assert [row.id for row in journal.pending()] == [input_id]  # queued, not lost

    journal.full = False
    faults.clear(STORAGE, "Space is free again.")
    eventually(lambda: journal.results_for_input(input_id), "the held result stored", every=0.02)
    assert len(journal.results_for_input(input_id)) == 1
    assert journal.pending() == []
    assert scoring.wait_idle(10)


def test_stopping_while_the_disk_is_full_leaves_the_input_queued(stages, caplog) -> None:
    scoring, journal, faults, folder = stages
    journal.full = True
    input_id, future = _submit(scoring, journal, folder, 2)
    with pytest.raises(StorageFull):
        future.result(timeout=60)
    assert faults.holds(STORAGE)
    caplog.set_level(logging.WARNING, logger="appliance.scoring")
    scoring.stop(timeout=30)  # does not wait for what can't be stored
    assert "1 results not stored for want of disk space" in caplog.text
    assert [row.id for row in journal.pending()] == [input_id]
    assert journal.results_for_input(input_id) == []
