"""The journal (SQLite, WAL): every input and every result, the source of truth for exactly-once scoring."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.errors import ConfigError

SCHEMA_VERSION = 2
# Version 1 (0.1.0) named the content column content_sha256 and held SHA-256 digests. Its rows keep
# them: such content dropped again after the upgrade hashes differently and is scored once more.
MIGRATIONS = {1: "ALTER TABLE inputs RENAME COLUMN content_sha256 TO content_hash;"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    id              INTEGER PRIMARY KEY,
    source          TEXT NOT NULL CHECK (source IN ('folder', 'grpc')),
    path            BLOB,             -- where the file was found, as the OS's bytes (names need not be UTF-8)
    file_name       TEXT NOT NULL,
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    content_hash    TEXT NOT NULL,    -- BLAKE3-256, hex (appliance.ingest.content_hash)
    state           TEXT NOT NULL CHECK (state IN ('queued', 'scored', 'rejected', 'failed', 'duplicate')),
    duplicate_of    INTEGER REFERENCES inputs(id),
    disposed_path   BLOB,             -- where the file went afterwards (empty when deleted)
    attempts        INTEGER NOT NULL DEFAULT 0,  -- starts that found it unfinished: a poison file is given up
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL
);
-- One scored (or queued, or rejected) input per content: a second drop becomes a 'duplicate' row.
-- 'failed' (a transient failure: the backend, a vanished file) does not count: the same content may be retried.
CREATE UNIQUE INDEX IF NOT EXISTS inputs_one_per_content ON inputs(content_hash)
    WHERE state NOT IN ('duplicate', 'failed');
CREATE INDEX IF NOT EXISTS inputs_by_state ON inputs(state);
CREATE INDEX IF NOT EXISTS inputs_by_file ON inputs(path, size, mtime_ns);

CREATE TABLE IF NOT EXISTS results (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the stream's resume point
    input_id        INTEGER NOT NULL REFERENCES inputs(id),
    frame_index     INTEGER NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('scored', 'rejected')),
    sop_uid         TEXT NOT NULL DEFAULT '',
    payload         BLOB NOT NULL,    -- serialized appliance.v1.Result without its sequence
    created_ms      INTEGER NOT NULL,
    UNIQUE (input_id, frame_index)    -- a frame is scored once, whatever happens
);
CREATE INDEX IF NOT EXISTS results_by_sop ON results(sop_uid);
"""

Source = Literal["folder", "grpc"]


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


@dataclass(frozen=True)
class Registration:
    input: InputRow
    duplicate_of: InputRow | None  # the earlier input with the same content, if any


@dataclass(frozen=True)
class StoredResult:
    seq: int
    input_id: int
    frame_index: int
    outcome: str
    payload: bytes


@dataclass(frozen=True)
class NewResult:
    frame_index: int
    outcome: Literal["scored", "rejected"]
    sop_uid: str
    payload: bytes
    transient: bool = False  # a rejection that says nothing about the content (backend failure, vanished file)


@dataclass(frozen=True)
class Counts:
    queued: int
    scored: int
    rejected: int
    duplicates: int
    last_sequence: int


_INPUT_COLUMNS = "id, source, path, file_name, size, mtime_ns, content_hash, state, duplicate_of"


class Journal:
    """Writes go through one connection under a lock; readers (streams) get a connection per thread.

    ``changed`` is notified after every commit that adds results, so streams wake without polling.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self.changed = threading.Condition()
        self._writer = self._connect()
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

    def _migrate(self, path: Path, version: int) -> None:
        """One transaction: the journal is upgraded whole, or left as it was."""
        step = MIGRATIONS[version]
        try:
            self._writer.executescript(f"BEGIN IMMEDIATE; {step} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
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
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def close(self) -> None:
        with self._write_lock:
            self._writer.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- inputs -----------------------------------------------------------------------------------

    def find_file(self, path: str, size: int, mtime_ns: int) -> InputRow | None:
        """An input already journaled for this very file (same path, size and mtime), if any."""
        row = (
            self._reader()
            .execute(
                f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE path = ? AND size = ? AND mtime_ns = ? "
                "ORDER BY id DESC LIMIT 1",
                (_path_bytes(path), size, mtime_ns),
            )
            .fetchone()
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
    ) -> Registration:
        """Record an input before any work on it. Content seen before becomes a 'duplicate' row."""
        now = _now_ms()
        with self._transaction() as db:
            first = db.execute(
                f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE content_hash = ? AND state NOT IN ('duplicate', 'failed')",
                (content_hash,),
            ).fetchone()
            state = "duplicate" if first else "queued"
            fields = (source, path, file_name, size, mtime_ns, content_hash, state, first[0] if first else None)
            cur = db.execute(
                "INSERT INTO inputs (source, path, file_name, size, mtime_ns, content_hash, state, "
                "duplicate_of, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (source, _path_bytes(path), *fields[2:], now, now),
            )
            input_id = cur.lastrowid
            assert input_id is not None
        row = InputRow(input_id, *fields)
        return Registration(input=row, duplicate_of=_row(first) if first else None)

    def pending(self) -> list[InputRow]:
        """Inputs journaled but never finished: what a crash left in flight, in arrival order."""
        rows = (
            self._reader().execute(f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE state = 'queued' ORDER BY id").fetchall()
        )
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
        row = self._reader().execute(f"SELECT {_INPUT_COLUMNS} FROM inputs WHERE id = ?", (input_id,)).fetchone()
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
                    for r in results:
                        c = db.execute(
                            "INSERT INTO results (input_id, frame_index, outcome, sop_uid, payload, created_ms) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (input_id, r.frame_index, r.outcome, r.sop_uid, r.payload, now),
                        )
                        assert c.lastrowid is not None
                        seqs.append(c.lastrowid)
                out.append(seqs)
        if any(out):
            with self.changed:
                self.changed.notify_all()
        return out

    def results_after(self, seq: int, limit: int = 256) -> list[StoredResult]:
        rows = (
            self._reader()
            .execute(
                "SELECT seq, input_id, frame_index, outcome, payload FROM results WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            )
            .fetchall()
        )
        return [StoredResult(*r) for r in rows]

    def results_for_input(self, input_id: int) -> list[StoredResult]:
        rows = (
            self._reader()
            .execute(
                "SELECT seq, input_id, frame_index, outcome, payload FROM results WHERE input_id = ? ORDER BY seq",
                (input_id,),
            )
            .fetchall()
        )
        return [StoredResult(*r) for r in rows]

    def result_by_seq(self, seq: int) -> StoredResult | None:
        row = (
            self._reader()
            .execute("SELECT seq, input_id, frame_index, outcome, payload FROM results WHERE seq = ?", (seq,))
            .fetchone()
        )
        return StoredResult(*row) if row else None

    def result_by_sop_uid(self, sop_uid: str) -> StoredResult | None:
        row = (
            self._reader()
            .execute(
                "SELECT seq, input_id, frame_index, outcome, payload FROM results WHERE sop_uid = ? "
                "ORDER BY seq LIMIT 1",
                (sop_uid,),
            )
            .fetchone()
        )
        return StoredResult(*row) if row else None

    def last_sequence(self) -> int:
        row = self._reader().execute("SELECT COALESCE(MAX(seq), 0) FROM results").fetchone()
        return int(row[0])

    def counts(self) -> Counts:
        db = self._reader()
        by_state = dict(db.execute("SELECT state, COUNT(*) FROM inputs GROUP BY state").fetchall())
        by_outcome = dict(db.execute("SELECT outcome, COUNT(*) FROM results GROUP BY outcome").fetchall())
        return Counts(
            queued=int(by_state.get("queued", 0)),
            scored=int(by_outcome.get("scored", 0)),
            rejected=int(by_outcome.get("rejected", 0)),
            duplicates=int(by_state.get("duplicate", 0)),
            last_sequence=self.last_sequence(),
        )

    def wait_for_results(self, after_seq: int, timeout: float) -> None:
        """Block until a result past ``after_seq`` exists or the timeout passes."""
        with self.changed:
            if self.last_sequence() > after_seq:
                return
            self.changed.wait(timeout)
