"""The one way in. Every input (a file in the watched folder, an image sent by Score, an instance the DICOM
receiver stored, an input the last run left unfinished) is registered here, deduplicated by content, counted,
and admitted to the scoring stages; a duplicate is disposed of by the one disposal policy.

A way in only says what arrived (an `Arrival`: where its bytes are and their hash); everything after that is
the same for all of them, in one order: journaled first, then prepared and scored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from appliance.config import WatchConfig
from appliance.domain.errors import RepeatedCrash
from appliance.domain.faults import STORAGE, Faults
from appliance.domain.result import InputFacts, Result
from appliance.files import disposal
from appliance.journal.journal import InputRow, Journal, Registration, Source
from appliance.scoring.stages import ScoringStages

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # starts that may find the same input unfinished before it is set aside
WAIT_FOR_SPACE_S = 1.0


@dataclass(frozen=True)
class Arrival:
    """An input as a way in knows it: where its bytes are, and their content hash."""

    source: Source
    path: Path
    file_name: str
    size: int
    content_hash: str
    mtime_ns: int = 0  # the folder's: with the path and size, how a file already seen is known again
    instance_uid: str | None = None  # a DICOM instance's SOP Instance UID, where known before decoding
    # The folder's file's inode as it was hashed: with its size and mtime, the scanner's own file, which it may
    # still rewrite, is scored only if it still holds what the journal records. A spooled copy is ours: None.
    inode: int | None = None
    picked_up: float | None = None  # when the way in first saw it (time.perf_counter): the latency's start


@dataclass(frozen=True)
class Submitted:
    """What became of an arrival: a new input on its way, or a duplicate of an earlier one (not scored
    again; its file disposed of like the original's), or the queued input's own file offered again."""

    input_id: int
    duplicate_of: int | None = None
    already_queued: bool = False
    results: Future[list[Result]] | None = None  # a new input's results, once scored or rejected


class Intake:
    def __init__(
        self,
        journal: Journal,
        stages: ScoringStages,
        watch: WatchConfig,
        on_duplicate: Callable[[], None],
        faults: Faults | None = None,
    ) -> None:
        self.journal = journal
        self.stages = stages
        self.watch = watch
        self.on_duplicate = on_duplicate  # the duplicates metric, for every way in
        self.faults = faults or Faults()

    def submit(self, arrival: Arrival) -> Submitted:
        """Journal, dedupe and admit one arrival: a new input is prepared in the pool (blocking while the
        stages are full) and scored."""
        reg = self.journal.register(
            source=arrival.source,
            path=str(arrival.path),
            file_name=arrival.file_name,
            size=arrival.size,
            mtime_ns=arrival.mtime_ns,
            content_hash=arrival.content_hash,
            instance_uid=arrival.instance_uid,
        )
        original = reg.duplicate_of
        if original is not None:
            return self._duplicate(arrival, reg, original)
        facts = InputFacts(
            input_id=reg.input.id,
            source=arrival.source,
            file_name=arrival.file_name,
            content_hash=arrival.content_hash,
            instance_uid=arrival.instance_uid or "",
        )
        screened = None if arrival.inode is None else (arrival.inode, arrival.size, arrival.mtime_ns)
        results = self.stages.submit(facts, arrival.path, screened=screened, picked_up=arrival.picked_up)
        return Submitted(reg.input.id, results=results)

    def _duplicate(self, arrival: Arrival, reg: Registration, original: InputRow) -> Submitted:
        if original.state == "queued" and original.path == str(arrival.path):
            # The queued input's own file, offered again (touched, say): its job owns the file.
            return Submitted(original.id, already_queued=True)
        log.info("input %d is a duplicate of input %d (same content); not scored again", reg.input.id, original.id)
        self.on_duplicate()
        if disposal.spooled(arrival.source):  # only our copy to drop: no journal write stands before an answer
            disposal.dispose(arrival.path, reg.input.id, arrival.source, None, self.watch)
        else:
            self.dispose_again(reg.input, arrival.path)
        return Submitted(reg.input.id, duplicate_of=original.id)

    def dispose_again(self, row: InputRow, path: Path) -> None:
        """A file whose content is scored already (a duplicate, or one stored before a crash and not yet
        moved aside) goes where its original's result sends it."""
        original = self.journal.get_input(row.duplicate_of) if row.duplicate_of else row
        stored = self.journal.results_for_input(original.id) if original else []
        first = stored[0].result() if stored else None
        where = disposal.dispose(path, row.id, row.source, first, self.watch)
        self.journal.set_disposed(row.id, where)

    def requeue(self, pending: list[InputRow], stopping: threading.Event) -> None:
        """Inputs journaled but never finished (a crash, a power cut) are scored now, once. One that was in
        flight at each of the last starts likely killed the process (OOM, a crash in a native decoder):
        it is set aside as repeated_crash instead of crash-looping on it."""
        if not pending:
            return
        log.info("requeueing %d inputs left in flight by the last run", len(pending))
        attempts = self._count_attempt([row.id for row in pending], stopping)
        if attempts is None:
            return
        for row in pending:
            if stopping.is_set():
                return
            assert row.path, "every input is journaled with its path"
            facts = InputFacts(
                input_id=row.id,
                source=row.source,
                file_name=row.file_name,
                content_hash=row.content_hash,
                instance_uid=row.instance_uid or "",
            )
            # A file that vanished meanwhile is rejected by the stages (file_vanished), like any read failure.
            if attempts.get(row.id, 0) > MAX_ATTEMPTS:
                log.error("input %d was unfinished at %d starts in a row; rejecting it", row.id, attempts[row.id])
                self.stages.submit_rejected(facts, Path(row.path), RepeatedCrash())
            else:
                # A folder file may have been rewritten while the daemon was down: its inode unknown here, it
                # is prepared only if it holds the bytes journaled (file_changed otherwise).
                screened = (-1, row.size, row.mtime_ns) if row.source == "folder" else None
                self.stages.submit(facts, Path(row.path), screened=screened)

    def _count_attempt(self, input_ids: list[int], stopping: threading.Event) -> dict[int, int] | None:
        """The journal's count of starts that found these inputs unfinished; on a full disk, once it has
        space again (None when stopping meanwhile)."""
        while True:
            try:
                return self.journal.count_attempt(input_ids)
            except Exception as e:
                if not self.faults.report(e):
                    raise
            while self.faults.holds(STORAGE):
                if stopping.wait(WAIT_FOR_SPACE_S):
                    return None
