"""The journal (SQLite, WAL): every input and every result, the source of truth for exactly-once scoring."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from appliance.domain.delivery import Delivery, DeliveryState
from appliance.domain.errors import ConfigError, JournalDamaged
from appliance.domain.result import Result
from appliance.domain.series import SeriesResult, among_best
from appliance.journal import payload as payload_format

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
_INPUTS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id              INTEGER PRIMARY KEY,
    source          TEXT NOT NULL CHECK (source != ''),  -- the way in (folder, grpc, ...): any new one fits
    path            BLOB,             -- where the file was found, as the OS's bytes (names need not be UTF-8)
    file_name       TEXT NOT NULL,
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    content_hash    TEXT NOT NULL,    -- BLAKE3-256, hex (appliance.journal.content_hash)
    state           TEXT NOT NULL CHECK (state IN ('queued', 'scored', 'rejected', 'failed', 'duplicate')),
    duplicate_of    INTEGER REFERENCES inputs(id),
    disposed_path   BLOB,             -- where the file went afterwards (empty when deleted)
    attempts        INTEGER NOT NULL DEFAULT 0,  -- starts that found it unfinished: a poison file is given up
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL{extra}
);
"""
# Version 4's column, beside what version 3 rebuilt the table with (version 3 steps rebuild it without).
_INSTANCE_UID = """,
    instance_uid    TEXT              -- a DICOM instance's SOP Instance UID, where the way in knows it up front"""
_INPUT_FIELDS = "id, source, path, file_name, size, mtime_ns, content_hash, state, duplicate_of, disposed_path, "
_INPUT_FIELDS += "attempts, created_ms, updated_ms"
_RESULTS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the stream's resume point
    input_id        INTEGER REFERENCES inputs(id),      -- an image result's input; NULL for a series result
    series_id       INTEGER REFERENCES series(id),      -- the series of a DICOM image, or a series result's
    frame_index     INTEGER NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('scored', 'rejected', 'series')),
    sop_uid         TEXT NOT NULL DEFAULT '',
    payload         BLOB NOT NULL,    -- the result without its sequence (appliance.journal.payload)
    created_ms      INTEGER NOT NULL,
    payload_version INTEGER NOT NULL DEFAULT 1,  -- the payload's format: appliance.journal.payload.VERSION
    UNIQUE (input_id, frame_index),   -- a frame is scored once, whatever happens
    CHECK ((outcome = 'series') = (input_id IS NULL))
);
"""
_RESULT_COPY = "seq, input_id, frame_index, outcome, sop_uid, payload, created_ms, payload_version"
# Each step upgrades one version to the next; a journal is upgraded whole, in one transaction, or not at all.
MIGRATIONS = {
    # Version 1 (0.1.0) named the content column content_sha256 and held SHA-256 digests. Its rows keep
    # them: such content dropped again after the upgrade hashes differently and is scored once more.
    1: "ALTER TABLE inputs RENAME COLUMN content_sha256 TO content_hash;",
    # Version 2 allowed only the folder and gRPC as sources (SQLite changes a CHECK by rebuilding the
    # table), and stored every payload as an appliance.v1.Result: those rows say payload version 1.
    2: _INPUTS_TABLE.format(name="inputs_v3", extra="")
    + f"INSERT INTO inputs_v3 ({_INPUT_FIELDS}) SELECT {_INPUT_FIELDS} FROM inputs;"
    + "DROP TABLE inputs; ALTER TABLE inputs_v3 RENAME TO inputs;"
    + "ALTER TABLE results ADD COLUMN payload_version INTEGER NOT NULL DEFAULT 1;",
    # Version 3 had no instance UIDs (its outbox table, new in 4, is made by SCHEMA).
    3: "ALTER TABLE inputs ADD COLUMN instance_uid TEXT;",
    # Version 4 had no series: a result needed an input (the table is rebuilt to let a series result have none),
    # and had no series column. Its sequence record is carried over: above MAX(seq) after a recovery.
    4: _RESULTS_TABLE.format(name="results_v5")
    + f"INSERT INTO results_v5 ({_RESULT_COPY}) SELECT {_RESULT_COPY} FROM results;"
    + "UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'results'), 0))"
    + " WHERE name = 'results_v5';"
    + "INSERT INTO sqlite_sequence (name, seq) SELECT 'results_v5', seq FROM sqlite_sequence WHERE name = 'results'"
    + " AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'results_v5');"
    + "DROP TABLE results; ALTER TABLE results_v5 RENAME TO results;",
}
SCHEMA = (
    _INPUTS_TABLE.format(name="inputs", extra=_INSTANCE_UID)
    + _RESULTS_TABLE.format(name="results")
    + """-- One scored (or queued, or rejected) input per content: a second drop becomes a 'duplicate' row.
-- 'failed' (a transient failure: the backend, a vanished file) does not count: the same content may be retried.
CREATE UNIQUE INDEX IF NOT EXISTS inputs_one_per_content ON inputs(content_hash)
    WHERE state NOT IN ('duplicate', 'failed');
-- And one per DICOM instance: the same instance sent again in another encoding (other bytes) is a duplicate
-- of one queued or scored; a rejection judged those bytes, so other bytes of the instance are tried.
CREATE UNIQUE INDEX IF NOT EXISTS inputs_one_per_instance ON inputs(instance_uid)
    WHERE instance_uid IS NOT NULL AND state IN ('queued', 'scored');
CREATE INDEX IF NOT EXISTS inputs_by_state ON inputs(state);
CREATE INDEX IF NOT EXISTS inputs_by_file ON inputs(path, size, mtime_ns);

CREATE INDEX IF NOT EXISTS results_by_sop ON results(sop_uid);
CREATE INDEX IF NOT EXISTS results_by_series ON results(series_id) WHERE series_id IS NOT NULL;

-- DICOM series being assembled from their images' results, and assembled: a series completes once no image of it
-- has been stored for the quiet period (due_ms), or at once where its header says all are in; a late image opens
-- it again, and its next series result revises the live one.
CREATE TABLE IF NOT EXISTS series (
    id              INTEGER PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    series_uid      TEXT NOT NULL,
    accession       TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL CHECK (state IN ('open', 'complete')),
    expected        INTEGER,          -- images (frames) its header says it holds, where it says
    completion      TEXT NOT NULL DEFAULT 'stable' CHECK (completion IN ('stable', 'header')),
    due_ms          INTEGER NOT NULL, -- when it completes, unless another image comes first
    first_ms        INTEGER NOT NULL, -- its first image result stored
    last_ms         INTEGER NOT NULL, -- and its last
    revision        INTEGER NOT NULL DEFAULT 0,  -- series results made so far
    version         INTEGER NOT NULL DEFAULT 0,  -- images joined so far: a result of an older read is not stored
    live_seq        INTEGER REFERENCES results(seq),  -- the one that stands (the others were revised)
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    UNIQUE (study_uid, series_uid)
);
CREATE INDEX IF NOT EXISTS series_due ON series(due_ms) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS series_by_uid ON series(series_uid);

-- Per series, its best images per label (as many as its manifest's [series] reads): enough to combine the series'
-- scores and choose its key images without reading every image, and what the PACS objects of a key image need
-- once its file is gone (header and display: appliance.delivery's bytes; display dropped once the series completes).
CREATE TABLE IF NOT EXISTS key_candidates (
    result_seq      INTEGER PRIMARY KEY REFERENCES results(seq),
    series_id       INTEGER NOT NULL REFERENCES series(id),
    scores          TEXT NOT NULL,    -- JSON {label: score}
    header          BLOB,
    display         BLOB
);
CREATE INDEX IF NOT EXISTS key_candidates_by_series ON key_candidates(series_id);

-- DICOM objects for the PACS (a result's report), stored in the transaction that stores their result: a
-- result is never kept without its report, nor a report without its result. The sender (appliance.delivery)
-- takes the due pending ones; a refused one is set aside with the PACS's status and never blocks the rest.
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY,
    result_seq       INTEGER NOT NULL REFERENCES results(seq),
    sop_class_uid    TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL UNIQUE,  -- new for every object: a PACS does not overwrite an instance
    payload          BLOB NOT NULL,    -- DICOM Part 10 bytes, sent as stored; emptied once delivered
    state            TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'refused')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_try_ms      INTEGER NOT NULL,
    status           INTEGER,          -- the last DIMSE status the PACS answered, NULL while it answered none
    reason           TEXT NOT NULL DEFAULT '',
    created_ms       INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_try_ms) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_by_result ON outbox(result_seq);

-- The journal's identity (journal_id, created_ms), matched at start against the marker file beside it.
CREATE TABLE IF NOT EXISTS meta (
    key             TEXT PRIMARY KEY,
    value           TEXT NOT NULL
);
"""
)

# SQLite's words for a file whose pages are not what they should be: never transient, never retried.
_DAMAGE_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
RECOVER_COMMAND = "appliance journal recover --config <the daemon's config>"


def is_damage(error: sqlite3.Error) -> bool:
    """True for an error that says the file is damaged (not a busy lock, a full disk, a constraint)."""
    code = getattr(error, "sqlite_errorcode", None)
    return type(error) is sqlite3.DatabaseError or (code is not None and code & 0xFF in _DAMAGE_CODES)


def damaged_sentence(path: Path, what: str) -> str:
    """The one sentence a refusal carries: what is wrong and the command that recovers."""
    return (
        f"The journal {path} {what}; nothing was changed: run `{RECOVER_COMMAND}` to set it aside, "
        "salvage what can be read and continue the sequence numbers after the last one issued."
    )


class SequenceReserve(Protocol):
    """Keeps, outside the journal, a ceiling above every sequence number it ever issued, so that a
    journal rebuilt after damage never hands a terminal a number it has already seen."""

    def ceiling(self) -> int: ...

    def reserve(self, top: int, committed: int) -> None:
        """Make a ceiling >= ``top`` durable before returning (``committed``: the highest number stored)."""

    def closed(self, committed: int) -> None:
        """The journal is closed; the highest number it stored is ``committed``."""


Source = str  # the way in, as results name it: "folder", "grpc", ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _path_bytes(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _row(raw: tuple[object, ...]) -> InputRow:
    values = list(raw)
    values[2] = os.fsdecode(values[2]) if values[2] is not None else None  # type: ignore[arg-type]
    return InputRow(*values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class InputRow:
    id: int
    source: str
    path: str | None
    file_name: str
    size: int
    mtime_ns: int
    content_hash: str
    state: str
    duplicate_of: int | None
    instance_uid: str | None = None  # a DICOM instance's SOP Instance UID, where the way in knew it up front


@dataclass(frozen=True)
class Registration:
    input: InputRow
    duplicate_of: InputRow | None  # the earlier input with the same content, if any


@dataclass(frozen=True)
class StoredResult:
    seq: int
    input_id: int | None  # None for a series result
    frame_index: int
    outcome: str  # "scored", "rejected", or "series" for a series result
    payload: bytes
    payload_version: int

    @property
    def kind(self) -> Literal["image", "series"]:
        return "series" if self.outcome == "series" else "image"

    def result(self) -> Result:
        """The stored image result, numbered with its sequence."""
        if self.kind != "image":
            raise ValueError(f"result {self.seq} is a series result")
        return payload_format.decode(self.payload, self.payload_version, self.seq)

    def series(self) -> SeriesResult:
        """The stored series result, numbered with its sequence."""
        if self.kind != "series":
            raise ValueError(f"result {self.seq} is an image result")
        return payload_format.decode_series(self.payload, self.payload_version, self.seq)


@dataclass(frozen=True)
class NewDelivery:
    """A DICOM object for the PACS, queued in the outbox with the result it reports."""

    sop_class_uid: str
    sop_instance_uid: str
    payload: bytes  # DICOM Part 10 bytes (preamble, file meta, dataset)


@dataclass(frozen=True)
class SeriesEntry:
    """Where an image result of a DICOM image goes in its series, stored with it in the same transaction."""

    study_uid: str
    series_uid: str
    accession: str
    stable_ms: int  # the quiet period: the series is due this long after this image, unless another comes
    expected: int = 0  # images (frames) the header says the series holds; 0 where it says nothing
    scores: Mapping[str, float] | None = None  # a scored image's scores (None: rejected, never a key image)
    kept: int = 1  # best images per label the series keeps (Manifest.series.kept)
    material: tuple[bytes, bytes | None] | None = None  # (header, display) where it may become a key image


@dataclass(frozen=True)
class NewResult:
    frame_index: int
    outcome: Literal["scored", "rejected"]
    sop_uid: str
    payload: bytes
    payload_version: int = payload_format.VERSION
    transient: bool = False  # a rejection that says nothing about the content (backend failure, vanished file)
    deliveries: tuple[NewDelivery, ...] = ()  # what goes to the PACS about it, stored in the same transaction
    series: SeriesEntry | None = None  # a DICOM image's series


@dataclass(frozen=True)
class KeyCandidate:
    """One of a series' best images, as kept for its series result: the image's stored result (with its heatmap)
    and the material its PACS objects are made of (None once used, or where none was kept)."""

    image: Result
    header: bytes | None
    display: bytes | None


@dataclass(frozen=True)
class SeriesState:
    """A series as its assembler reads it before completing it."""

    id: int
    study_uid: str
    series_uid: str
    accession: str
    state: str
    completion: str
    due_ms: int
    first_ms: int
    last_ms: int
    revision: int
    version: int  # what complete_series and postpone_series check: no image joined since this was read
    scored: int
    rejected: int
    live: StoredResult | None  # the result a new one revises
    candidates: list[KeyCandidate]


@dataclass(frozen=True)
class OutboxItem:
    """A pending outbox row, as the sender takes it."""

    id: int
    result_seq: int
    sop_class_uid: str
    sop_instance_uid: str
    payload: bytes
    attempts: int
    created_ms: int


@dataclass(frozen=True)
class Counts:
    queued: int
    scored: int
    rejected: int
    duplicates: int
    last_sequence: int


_RESULT_FIELDS = "seq, input_id, frame_index, outcome, payload, payload_version"
_INPUT_COLUMNS = "id, source, path, file_name, size, mtime_ns, content_hash, state, duplicate_of, instance_uid"


class Journal:
    """Writes go through one connection under a lock; readers (streams) get a connection per thread.

    ``changed`` is notified after every commit that adds results, so streams wake without polling.
    """

    def __init__(self, path: Path, reserve: SequenceReserve | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self.changed = threading.Condition()
        self._reserve = reserve
        self._problem: str | None = None
        self._problem_lock = threading.Lock()
        self._on_damage: list[Callable[[str], None]] = []
        self._last_counts = Counts(0, 0, 0, 0, 0)
        try:
            self._writer = self._connect()
            self._open()
        except sqlite3.Error as e:
            # A header or a schema page that SQLite cannot read: a sentence, never a traceback.
            if getattr(self, "_writer", None) is not None:
                self._writer.close()
            raise JournalDamaged(damaged_sentence(path, f"cannot be opened ({e})")) from e
        self._committed = self.issued()

    def _open(self) -> None:
        path = self.path
        with self._write_lock:
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
            has_tables = self._writer.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'inputs'").fetchone()[0]
            if has_tables and version in MIGRATIONS:
                self._migrate(path, version)
                version = SCHEMA_VERSION
            if has_tables and version != SCHEMA_VERSION:
                self._writer.close()
                raise ConfigError(
                    f"The journal {path} has schema version {version}; this appliance needs {SCHEMA_VERSION}. "
                    "Move it aside (its results stay readable with sqlite3) and start again."
                )
            self._writer.executescript(SCHEMA)
            self._writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # A new journal (or one from before identities) gets its identity once; it never changes.
            self._writer.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('journal_id', ?), ('created_ms', ?)",
                (uuid.uuid4().hex, str(_now_ms())),
            )

    # --- identity and damage ----------------------------------------------------------------------

    def identity(self) -> str:
        """The random id given to this journal when it was created."""
        row = self._read_one("SELECT value FROM meta WHERE key = 'journal_id'", ())
        assert row is not None, "every opened journal has an identity"
        return str(row[0])

    def issued(self) -> int:
        """The highest sequence number ever issued (AUTOINCREMENT's record; above MAX(seq) after a recovery)."""
        row = self._read_one(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM results), 0), "
            "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'results'), 0))",
            (),
        )
        return int(row[0]) if row else 0

    def problem(self) -> str | None:
        """None while the journal works; once SQLite reported damage, the sentence to show in health and
        GetStatus. From then on the journal takes no writes: no file is taken or moved away."""
        return self._problem

    def on_damage(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(sentence)`` once, in the thread that found it, when the journal turns out damaged
        (never under the journal's lock: it may read the journal)."""
        self._on_damage.append(listener)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            with self._problem_lock:
                first = self._problem is None
                if first:
                    self._problem = damaged_sentence(self.path, f"is damaged ({e}); the appliance takes no new files")
            assert self._problem is not None
            if first:
                log.error("%s", self._problem)
                for listener in self._on_damage:
                    listener(self._problem)
            raise JournalDamaged(self._problem) from e

    def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._guard():
            return self._reader().execute(sql, params).fetchall()

    def _read_one(self, sql: str, params: Sequence[Any]) -> Any:
        with self._guard():
            return self._reader().execute(sql, params).fetchone()

    def _migrate(self, path: Path, version: int) -> None:
        """One transaction: the journal is upgraded whole, or left as it was."""
        steps = " ".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
        try:
            # Off while a table is rebuilt: its old copy is dropped under the results that refer to it, and
            # the new one takes every row with its id, so each reference holds as it did before.
            self._writer.execute("PRAGMA foreign_keys=OFF")
            self._writer.executescript(f"BEGIN IMMEDIATE; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            self._writer.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            if self._writer.in_transaction:
                self._writer.rollback()
            self._writer.close()
            raise ConfigError(
                f"The journal {path} could not be upgraded from schema version {version} ({e}); it is unchanged. "
                "Move it aside (its results stay readable with sqlite3) and start again."
            ) from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed result survives a power cut, not only a crash of this process.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._problem is not None:
            raise JournalDamaged(self._problem)
        with self._guard(), self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def set_reserve(self, reserve: SequenceReserve) -> None:
        """From now on no number above ``reserve.ceiling()`` is committed before the reserve is raised."""
        with self._write_lock:
            self._reserve = reserve

    def close(self) -> None:
        with self._write_lock:
            if self._reserve is not None:
                reserve, self._reserve = self._reserve, None
                try:
                    reserve.closed(self._committed)
                except OSError as e:  # the marker keeps its last ceiling, which is still above every number
                    log.warning("the journal marker could not be updated at stop: %s", e.strerror)
            self._writer.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- inputs -----------------------------------------------------------------------------------

    def find_file(self, path: str, size: int, mtime_ns: int) -> InputRow | None:
        """An input already journaled for this very file (same path, size and mtime), if any."""
        if self._problem is not None:  # the gate to taking a file: none is taken while damaged
            raise JournalDamaged(self._problem)
        row = self._read_one(
            f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE path = ? AND size = ? AND mtime_ns = ? "
            "ORDER BY id DESC LIMIT 1",
            (_path_bytes(path), size, mtime_ns),
        )
        return _row(row) if row else None

    def register(
        self,
        *,
        source: Source,
        path: str | None,
        file_name: str,
        size: int,
        mtime_ns: int,
        content_hash: str,
        instance_uid: str | None = None,
    ) -> Registration:
        """Record an input before any work on it. Content seen before, or a DICOM instance seen before
        (``instance_uid``, where the way in knows it), becomes a 'duplicate' row."""
        now = _now_ms()
        with self._transaction() as db:
            first = db.execute(
                f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE (content_hash = ? AND state NOT IN ('duplicate', "
                "'failed')) OR (instance_uid = ? AND state IN ('queued', 'scored')) ORDER BY id LIMIT 1",
                (content_hash, instance_uid),
            ).fetchone()
            state = "duplicate" if first else "queued"
            fields = (source, path, file_name, size, mtime_ns, content_hash, state, first[0] if first else None)
            cur = db.execute(
                "INSERT INTO inputs (source, path, file_name, size, mtime_ns, content_hash, state, "
                "duplicate_of, created_ms, updated_ms, instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (source, _path_bytes(path), *fields[2:], now, now, instance_uid),
            )
            input_id = cur.lastrowid
            assert input_id is not None
        row = InputRow(input_id, *fields, instance_uid=instance_uid)
        return Registration(input=row, duplicate_of=_row(first) if first else None)

    def pending(self) -> list[InputRow]:
        """Inputs journaled but never finished: what a crash left in flight, in arrival order."""
        rows = self._read(f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE state = 'queued' ORDER BY id", ())
        return [_row(r) for r in rows]

    def count_attempt(self, input_ids: list[int]) -> dict[int, int]:
        """Record that a start found these inputs unfinished; returns each one's count so far."""
        with self._transaction() as db:
            db.executemany("UPDATE inputs SET attempts = attempts + 1 WHERE id = ?", [(i,) for i in input_ids])
            rows = db.execute(
                f"SELECT id, attempts FROM inputs WHERE id IN ({','.join('?' * len(input_ids))})", input_ids
            ).fetchall()
        return {int(i): int(n) for i, n in rows}

    def get_input(self, input_id: int) -> InputRow | None:
        row = self._read_one(f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE id = ?", (input_id,))
        return _row(row) if row else None

    def set_disposed(self, input_id: int, disposed_path: str) -> None:
        self.set_disposed_many([(input_id, disposed_path)])

    def set_disposed_many(self, items: list[tuple[int, str]]) -> None:
        if not items:
            return
        now = _now_ms()
        with self._transaction() as db:
            # Never over a recorded move: a rescan may have moved the file aside first, and then the
            # finisher finds nothing left to move (its '' must not erase where the file went).
            db.executemany(
                "UPDATE inputs SET disposed_path = ?, updated_ms = ? WHERE id = ? "
                "AND (disposed_path IS NULL OR ? != '')",
                [(_path_bytes(path), now, input_id, path) for input_id, path in items],
            )

    # --- results ----------------------------------------------------------------------------------

    def complete(self, input_id: int, results: list[NewResult]) -> list[int]:
        """Store an input's results and close it, in one transaction. Returns their sequence numbers.

        An input that is no longer queued (finished by an earlier run) is left alone and nothing is
        stored: that is what makes a replayed input scored once only.
        """
        return self.complete_many([(input_id, results)])[0]

    def complete_many(self, items: list[tuple[int, list[NewResult]]]) -> list[list[int]]:
        """`complete` for several inputs in one transaction (one fsync): a burst pays one disk flush per
        group, not per file. Returns each input's sequence numbers, empty for one already finished."""
        if any(not results for _, results in items):
            raise ValueError("complete() needs at least one result per input")
        now = _now_ms()
        out: list[list[int]] = []
        with self._transaction() as db:
            for input_id, results in items:
                if any(r.outcome == "scored" for r in results):
                    state = "scored"
                else:
                    state = "failed" if all(r.transient for r in results) else "rejected"
                seqs: list[int] = []
                cur = db.execute(
                    "UPDATE inputs SET state = ?, updated_ms = ? WHERE id = ? AND state = 'queued'",
                    (state, now, input_id),
                )
                if cur.rowcount == 1:
                    touched: set[int] = set()
                    for r in results:
                        series_id = self._join_series(db, r.series, now) if r.series is not None else None
                        c = db.execute(
                            "INSERT INTO results (input_id, series_id, frame_index, outcome, sop_uid, payload, "
                            "payload_version, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                input_id,
                                series_id,
                                r.frame_index,
                                r.outcome,
                                r.sop_uid,
                                r.payload,
                                r.payload_version,
                                now,
                            ),
                        )
                        assert c.lastrowid is not None
                        seqs.append(c.lastrowid)
                        self._queue_deliveries(db, c.lastrowid, r.deliveries, now)
                        if series_id is not None:
                            assert r.series is not None
                            touched.add(series_id)
                            if r.series.scores is not None:
                                self._add_candidate(db, series_id, c.lastrowid, r.series)
                    for series_id in touched:
                        self._complete_by_header(db, series_id, now)
                out.append(seqs)
            top = max((max(s) for s in out if s), default=0)
            self._reserve_up_to(top)
        self._stored(top)
        return out

    def _reserve_up_to(self, top: int) -> None:
        """Before COMMIT: no number is ever stored (and streamed) above the marker's ceiling."""
        if self._reserve is not None and top > self._reserve.ceiling():
            self._reserve.reserve(top, self._committed)

    def _stored(self, top: int) -> None:
        """After COMMIT of numbers up to ``top`` (0: none): streams wake."""
        self._committed = max(self._committed, top)
        if top:
            with self.changed:
                self.changed.notify_all()

    @staticmethod
    def _queue_deliveries(db: sqlite3.Connection, seq: int, deliveries: Sequence[NewDelivery], now: int) -> None:
        db.executemany(
            # OR IGNORE: a report made again for the same result (content scored again after a recovery), or a
            # key image's heatmap in a series' revision, is the same instance, already queued or sent: never twice.
            "INSERT OR IGNORE INTO outbox (result_seq, sop_class_uid, sop_instance_uid, payload, "
            "state, next_try_ms, created_ms, updated_ms) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
            [(seq, d.sop_class_uid, d.sop_instance_uid, d.payload, now, now, now) for d in deliveries],
        )

    # --- series -----------------------------------------------------------------------------------

    @staticmethod
    def _join_series(db: sqlite3.Connection, entry: SeriesEntry, now: int) -> int:
        """The image's series, opened (or opened again: a late image) with its quiet period starting now."""
        due = now + entry.stable_ms
        row = db.execute(
            "SELECT id FROM series WHERE study_uid = ? AND series_uid = ?", (entry.study_uid, entry.series_uid)
        ).fetchone()
        if row is None:
            cur = db.execute(
                "INSERT INTO series (study_uid, series_uid, accession, state, expected, due_ms, first_ms, last_ms, "
                "created_ms, updated_ms) VALUES (?, ?, ?, 'open', ?, ?, ?, ?, ?, ?)",
                (entry.study_uid, entry.series_uid, entry.accession, entry.expected or None, due, now, now, now, now),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid
        db.execute(
            "UPDATE series SET state = 'open', completion = 'stable', due_ms = ?, last_ms = ?, updated_ms = ?, "
            "version = version + 1, expected = COALESCE(?, expected), "
            "accession = CASE WHEN accession = '' THEN ? ELSE accession END WHERE id = ?",
            (due, now, now, entry.expected or None, entry.accession, row[0]),
        )
        return int(row[0])

    @staticmethod
    def _complete_by_header(db: sqlite3.Connection, series_id: int, now: int) -> None:
        """Due now where its header's count of images is reached."""
        db.execute(
            "UPDATE series SET due_ms = ?, completion = 'header' WHERE id = ? AND state = 'open' "
            "AND expected IS NOT NULL AND expected <= (SELECT COUNT(*) FROM results WHERE series_id = ? "
            "AND outcome != 'series')",
            (now, series_id, series_id),
        )

    @staticmethod
    def _add_candidate(db: sqlite3.Connection, series_id: int, seq: int, entry: SeriesEntry) -> None:
        """Keep the image among the series' best, and let go of those no longer among the best ``kept`` for any
        label: the best images of a series are always among its candidates, as each image better than them was
        kept when it came."""
        assert entry.scores is not None
        header, display = entry.material if entry.material is not None else (None, None)
        db.execute(
            "INSERT INTO key_candidates (result_seq, series_id, scores, header, display) VALUES (?, ?, ?, ?, ?)",
            (seq, series_id, json.dumps(dict(entry.scores)), header, display),
        )
        rows = db.execute(
            "SELECT result_seq, scores FROM key_candidates WHERE series_id = ? ORDER BY result_seq", (series_id,)
        ).fetchall()
        scored = [(int(s), json.loads(text)) for s, text in rows]
        keep = {id(scores) for scores in among_best([scores for _, scores in scored], entry.kept)}
        gone = [(s,) for s, scores in scored if id(scores) not in keep]
        db.executemany("DELETE FROM key_candidates WHERE result_seq = ?", gone)

    def key_scores(self, study_uid: str, series_uid: str) -> list[dict[str, float]]:
        """The scores of the series' key candidates, in the order they came (domain.series.key_floors reads them):
        an image under every floor is never a key image, and needs no material kept."""
        rows = self._read(
            "SELECT k.scores FROM key_candidates k JOIN series s ON s.id = k.series_id "
            "WHERE s.study_uid = ? AND s.series_uid = ? ORDER BY k.result_seq",
            (study_uid, series_uid),
        )
        return [json.loads(r[0]) for r in rows]

    def series_due(self, now_ms: int) -> list[int]:
        """Open series whose quiet period is over (or whose header said all are in), the longest due first."""
        rows = self._read("SELECT id FROM series WHERE state = 'open' AND due_ms <= ? ORDER BY due_ms, id", (now_ms,))
        return [int(r[0]) for r in rows]

    def next_series_due_ms(self) -> int | None:
        row = self._read_one("SELECT MIN(due_ms) FROM series WHERE state = 'open'", ())
        return int(row[0]) if row[0] is not None else None

    def open_series(self) -> int:
        """Series assembling now: an image stored, their result not yet made."""
        return int(self._read_one("SELECT COUNT(*) FROM series WHERE state = 'open'", ())[0])

    def restart_series_clocks(self, now_ms: int, stable_ms: int) -> int:
        """At a start: every open series waits a whole quiet period again (its images still queued in the journal
        are scored first), but for those whose header said all are in. Returns how many are open."""
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET due_ms = MAX(due_ms, ?) WHERE state = 'open' AND completion = 'stable'",
                (now_ms + stable_ms,),
            )
            return int(db.execute("SELECT COUNT(*) FROM series WHERE state = 'open'").fetchone()[0])

    def postpone_series(self, series_id: int, until_ms: int, read: SeriesState | None = None) -> None:
        """A series whose result could not be made is tried again later: unless an image came (or another
        postponement) since ``read``; None where the series could not even be read."""
        with self._transaction() as db:
            if read is None:
                db.execute("UPDATE series SET due_ms = ? WHERE id = ? AND state = 'open'", (until_ms, series_id))
                return
            db.execute(
                "UPDATE series SET due_ms = ? WHERE id = ? AND state = 'open' AND version = ? AND due_ms = ?",
                (until_ms, series_id, read.version, read.due_ms),
            )

    def series_state(self, series_id: int) -> SeriesState | None:
        row = self._read_one(
            "SELECT id, study_uid, series_uid, accession, state, completion, due_ms, first_ms, last_ms, revision, "
            "version, live_seq FROM series WHERE id = ?",
            (series_id,),
        )
        if row is None:
            return None
        counts = dict(
            self._read(
                "SELECT outcome, COUNT(*) FROM results WHERE series_id = ? AND outcome != 'series' GROUP BY outcome",
                (series_id,),
            )
        )
        live = self.result_by_seq(int(row[11])) if row[11] is not None else None
        candidates = [
            KeyCandidate(StoredResult(*r[:6]).result(), r[6], r[7])
            for r in self._read(
                f"SELECT {', '.join('r.' + f for f in _RESULT_FIELDS.split(', '))}, k.header, k.display "
                "FROM key_candidates k JOIN results r ON r.seq = k.result_seq WHERE k.series_id = ? ORDER BY r.seq",
                (series_id,),
            )
        ]
        sid, study_uid, series_uid, accession, state, completion, due_ms, first_ms, last_ms, revision, version = row[
            :11
        ]
        return SeriesState(
            sid,
            study_uid,
            series_uid,
            accession,
            state,
            completion,
            due_ms,
            first_ms,
            last_ms,
            revision,
            version,
            scored=int(counts.get("scored", 0)),
            rejected=int(counts.get("rejected", 0)),
            live=live,
            candidates=candidates,
        )

    def complete_series(self, read: SeriesState, payload: bytes, deliveries: Sequence[NewDelivery] = ()) -> int | None:
        """Store a series' result (made of ``read``) with its objects for the PACS, and close the series, in one
        transaction. None (nothing stored) where an image of it was stored since: it is due again later."""
        now = _now_ms()
        series_id = read.id
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE series SET state = 'complete', revision = revision + 1, updated_ms = ? "
                "WHERE id = ? AND state = 'open' AND version = ?",
                (now, series_id, read.version),
            )
            if cur.rowcount != 1:
                return None
            c = db.execute(
                "INSERT INTO results (input_id, series_id, frame_index, outcome, sop_uid, payload, payload_version, "
                "created_ms) VALUES (NULL, ?, 0, 'series', '', ?, ?, ?)",
                (series_id, payload, payload_format.VERSION, now),
            )
            seq = c.lastrowid
            assert seq is not None
            db.execute("UPDATE series SET live_seq = ? WHERE id = ?", (seq, series_id))
            self._queue_deliveries(db, seq, deliveries, now)
            # The key images' pictures are in the outbox now; a revision keeps their headers, and their heatmaps
            # already sent are the same instances.
            db.execute("UPDATE key_candidates SET display = NULL WHERE series_id = ?", (series_id,))
            self._reserve_up_to(seq)
        self._stored(seq)
        return seq

    def series_result(self, series_uid: str) -> StoredResult | None:
        """The series' live result (its latest revision); the latest series of that UID where studies share it."""
        row = self._read_one(
            f"SELECT {', '.join('r.' + f for f in _RESULT_FIELDS.split(', '))} FROM series s "
            "JOIN results r ON r.seq = s.live_seq WHERE s.series_uid = ? ORDER BY s.id DESC LIMIT 1",
            (series_uid,),
        )
        return StoredResult(*row) if row else None

    def results_after(self, seq: int, limit: int = 256) -> list[StoredResult]:
        rows = self._read(
            f"SELECT {_RESULT_FIELDS} FROM results WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [StoredResult(*r) for r in rows]

    def results_for_input(self, input_id: int) -> list[StoredResult]:
        rows = self._read(
            f"SELECT {_RESULT_FIELDS} FROM results WHERE input_id = ? ORDER BY seq",
            (input_id,),
        )
        return [StoredResult(*r) for r in rows]

    def result_by_seq(self, seq: int) -> StoredResult | None:
        row = self._read_one(f"SELECT {_RESULT_FIELDS} FROM results WHERE seq = ?", (seq,))
        return StoredResult(*row) if row else None

    def result_by_sop_uid(self, sop_uid: str) -> StoredResult | None:
        row = self._read_one(
            # The latest input's first frame: an instance rejected, then sent again in another encoding and
            # scored, is answered with its score.
            f"SELECT {_RESULT_FIELDS} FROM results WHERE sop_uid = ? ORDER BY input_id DESC, seq LIMIT 1",
            (sop_uid,),
        )
        return StoredResult(*row) if row else None

    def last_sequence(self) -> int:
        row = self._read_one("SELECT COALESCE(MAX(seq), 0) FROM results", ())
        return int(row[0])

    def counts(self) -> Counts:
        """The counts; on a damaged journal the last ones read, so GetStatus still answers (with the problem)."""
        try:
            by_state = dict(self._read("SELECT state, COUNT(*) FROM inputs GROUP BY state", ()))
            by_outcome = dict(self._read("SELECT outcome, COUNT(*) FROM results GROUP BY outcome", ()))
            last = self.last_sequence()
        except JournalDamaged:
            return self._last_counts
        self._last_counts = Counts(
            queued=int(by_state.get("queued", 0)),
            scored=int(by_outcome.get("scored", 0)),
            rejected=int(by_outcome.get("rejected", 0)),
            duplicates=int(by_state.get("duplicate", 0)),
            last_sequence=last,
        )
        return self._last_counts

    # --- the outbox to the PACS ---------------------------------------------------------------------

    def outbox_due(self, now_ms: int, limit: int) -> list[OutboxItem]:
        """Pending objects whose next try is due, the longest due first (objects never tried: in the order they
        were stored). By due time, not by age: while the PACS is down, objects stored later get their turn too."""
        rows = self._read(
            "SELECT id, result_seq, sop_class_uid, sop_instance_uid, payload, attempts, created_ms FROM outbox "
            "WHERE state = 'pending' AND next_try_ms <= ? ORDER BY next_try_ms, id LIMIT ?",
            (now_ms, limit),
        )
        return [OutboxItem(*r) for r in rows]

    def outbox_delivered(self, ids: list[int], status: int = 0x0000) -> None:
        """The PACS acknowledged these (success, or a warning ``status``). Their bytes are dropped: the PACS
        holds them now, and the journal would otherwise grow by a report per result."""
        if not ids:
            return
        now = _now_ms()
        with self._transaction() as db:
            db.executemany(
                "UPDATE outbox SET state = 'delivered', payload = X'', status = ?, reason = '', updated_ms = ? "
                "WHERE id = ? AND state = 'pending'",
                [(status, now, i) for i in ids],
            )

    def outbox_retry(self, ids: list[int], next_try_ms: int, status: int | None, reason: str) -> None:
        """Not delivered this time (no association, or a transient status): tried again at ``next_try_ms``."""
        if not ids:
            return
        now = _now_ms()
        with self._transaction() as db:
            db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, next_try_ms = ?, status = ?, reason = ?, updated_ms = ? "
                "WHERE id = ? AND state = 'pending'",
                [(next_try_ms, status, reason, now, i) for i in ids],
            )

    def outbox_refused(self, item_id: int, status: int, reason: str) -> None:
        """Refused for good: set aside with the PACS's status and reason (its bytes kept, to look at)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = 'refused', attempts = attempts + 1, status = ?, reason = ?, updated_ms = ? "
                "WHERE id = ? AND state = 'pending'",
                (status, reason, _now_ms(), item_id),
            )

    def outbox_hasten(self, now_ms: int) -> int:
        """Every pending object waiting out a back-off is due now (the PACS answers again: the outbox drains
        instead of each object sitting out its own wait). Returns how many."""
        with self._transaction() as db:
            return int(
                db.execute(
                    "UPDATE outbox SET next_try_ms = ? WHERE state = 'pending' AND next_try_ms > ?", (now_ms, now_ms)
                ).rowcount
            )

    def outbox_depth(self) -> tuple[int, int | None]:
        """How many objects wait for the PACS, and when the oldest of them was stored (None when none)."""
        row = self._read_one("SELECT COUNT(*), MIN(created_ms) FROM outbox WHERE state = 'pending'", ())
        return int(row[0]), (int(row[1]) if row[1] is not None else None)

    def next_outbox_wake_ms(self) -> int | None:
        """The earliest next try of a pending object; None when nothing waits."""
        row = self._read_one("SELECT MIN(next_try_ms) FROM outbox WHERE state = 'pending'", ())
        return int(row[0]) if row[0] is not None else None

    def delivery_of(self, seq: int) -> Delivery | None:
        """Where the report of result ``seq`` stands (the first object stored with it); None if it has none."""
        row = self._read_one(
            "SELECT state, attempts, status, reason, sop_instance_uid FROM outbox WHERE result_seq = ? "
            "ORDER BY id LIMIT 1",
            (seq,),
        )
        if row is None:
            return None
        state, attempts, status, reason, sop_instance_uid = row
        return Delivery(DeliveryState(state), int(attempts), status, str(reason), str(sop_instance_uid))

    def wait_for_results(self, after_seq: int, timeout: float) -> None:
        """Block until a result past ``after_seq`` exists or the timeout passes."""
        with self.changed:
            if self.last_sequence() > after_seq:
                return
            self.changed.wait(timeout)
