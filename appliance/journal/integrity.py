"""The journal's start-up guard: integrity and identity checked against a marker file, and recovery."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.domain.errors import ConfigError, JournalDamaged
from appliance.files.durable import rename_durably, sync_folder, write_atomic
from appliance.journal.journal import SCHEMA_VERSION, Journal, damaged_sentence

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.sqlite3"  # in storage.data_dir
# Sequence numbers reserved per marker write. The marker's ceiling is made durable before any number above
# it is committed, so it is never below a number a terminal has seen; the cost is one small file write per
# RESERVE results, and a rebuilt journal skips at most this many numbers.
RESERVE = 1000
SQLITE_MAGIC = b"SQLite format 3\x00"
_INPUT_COLUMNS = [
    *("id", "source", "path", "file_name", "size", "mtime_ns", "content_hash", "state", "duplicate_of"),
    *("disposed_path", "attempts", "created_ms", "updated_ms", "instance_uid"),
]
_RESULT_COLUMNS = [
    *("seq", "input_id", "series_id", "frame_index", "outcome", "sop_uid", "payload", "created_ms"),
    "payload_version",
]
_NEWER_RESULT_COLUMNS = ("payload_version", "series_id")  # absent from older schemas: their defaults stand
# Tables salvaged whole where they exist (schema 5 on): the series and their best images, so that series results
# kept still belong to their series, and a late image revises the one that stood.
_SERIES_TABLES = {
    "series": [
        *("id", "study_uid", "series_uid", "accession", "state", "expected", "completion", "due_ms", "first_ms"),
        *("last_ms", "revision", "version", "live_seq", "created_ms", "updated_ms"),
    ],
    "key_candidates": ["result_seq", "series_id", "scores", "header", "display"],
}
_OUTBOX_COLUMNS = [
    *("id", "result_seq", "sop_class_uid", "sop_instance_uid", "payload", "state", "attempts", "next_try_ms"),
    *("status", "reason", "created_ms", "updated_ms"),
]
_RENAMED = {"content_hash": "content_sha256"}  # schema version 1's name for the column


def marker_path(journal: Path) -> Path:
    return journal.with_suffix(".marker")


def copy_path(journal: Path, identity_dir: Path) -> Path:
    """The marker's copy, kept where losing the data folder's contents does not take it too."""
    return identity_dir / marker_path(journal).name


def _lock_path(journal: Path) -> Path:
    return journal.with_suffix(".lock")


@dataclass(frozen=True)
class Marker:
    """What the data folder remembers about its journal, outside it."""

    journal_id: str
    ceiling: int  # above every sequence number the journal ever issued: a rebuilt one continues after it
    floor: int  # numbers up to here were committed: a journal that holds fewer lost results


def _read_one(journal: Path, path: Path) -> Marker | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Marker(str(raw["journal_id"]), int(raw["ceiling"]), int(raw["floor"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JournalDamaged(damaged_sentence(journal, f"has an unreadable marker file {path} ({e})")) from e


def read_marker(journal: Path, identity_dir: Path | None = None) -> Marker | None:
    """What the marker beside the journal and its copy in ``identity_dir`` say together, None if neither is
    there; JournalDamaged if one cannot be read or the two name different journals. Each is written before
    any number under its ceiling is issued, so the higher of the two is the truth (a crash between the two
    writes leaves one behind)."""
    found = [_read_one(journal, marker_path(journal))]
    if identity_dir is not None:
        found.append(_read_one(journal, copy_path(journal, identity_dir)))
    markers = [m for m in found if m is not None]
    if not markers:
        return None
    if len({m.journal_id for m in markers}) > 1:
        assert identity_dir is not None
        raise JournalDamaged(
            damaged_sentence(
                journal,
                f"has a marker ({marker_path(journal)}) and a marker copy ({copy_path(journal, identity_dir)}) "
                "that name different journals",
            )
        )
    return Marker(markers[0].journal_id, max(m.ceiling for m in markers), max(m.floor for m in markers))


def write_marker(journal: Path, marker: Marker, identity_dir: Path | None = None) -> None:
    """Beside the journal and, with ``identity_dir``, its copy there; each atomic and durable (a temporary
    file, fsync, rename over the old one, fsync of the folder)."""
    body = {
        "journal_id": marker.journal_id,
        "ceiling": marker.ceiling,
        "floor": marker.floor,
        "written_ms": time.time_ns() // 1_000_000,
    }
    paths = [marker_path(journal)]
    if identity_dir is not None:
        paths.append(copy_path(journal, identity_dir))
    for path in paths:
        write_atomic(path, (json.dumps(body) + "\n").encode(), sole_writer=True)  # under the journal's lock


class MarkerReserve:
    """The journal's SequenceReserve: raises the marker's ceiling ahead of the numbers it issues. Holds the
    data folder's lock (two daemons, or a recovery under a running daemon, are refused) until closed."""

    def __init__(self, journal: Path, marker: Marker, lock_fd: int, identity_dir: Path | None) -> None:
        self._journal = journal
        self._marker = marker
        self._lock_fd = lock_fd
        self._identity_dir = identity_dir

    def ceiling(self) -> int:
        return self._marker.ceiling

    def reserve(self, top: int, committed: int) -> None:
        marker = Marker(self._marker.journal_id, top + RESERVE, committed)
        write_marker(self._journal, marker, self._identity_dir)
        self._marker = marker

    def closed(self, committed: int) -> None:
        try:
            marker = Marker(self._marker.journal_id, max(self._marker.ceiling, committed), committed)
            write_marker(self._journal, marker, self._identity_dir)
            self._marker = marker
        finally:
            os.close(self._lock_fd)


def _lock(journal: Path) -> int:
    journal.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A journal made by an older version, or under a looser umask, is closed to other users: it names inputs.
    for part in (journal, Path(f"{journal}-wal"), Path(f"{journal}-shm"), marker_path(journal)):
        with contextlib.suppress(FileNotFoundError):
            if part.stat().st_mode & 0o077:
                part.chmod(0o600)
    fd = os.open(_lock_path(journal), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise ConfigError(
            f"The journal {journal} is in use by another appliance process (it holds {_lock_path(journal)}); "
            "stop it first."
        ) from e
    return fd


# --- diagnosis ----------------------------------------------------------------------------------------

Kind = Literal["ok", "new", "adopt", "missing", "empty", "damaged", "foreign", "behind"]


@dataclass(frozen=True)
class Diagnosis:
    kind: Kind
    problem: str | None  # completes "The journal PATH ..." (None when it may be opened)
    marker: Marker | None
    journal_id: str | None = None
    issued: int = 0


def _file_problem(path: Path) -> str | None:
    """Damage seen from the file alone, before SQLite reads it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100:
        return f"is truncated ({size} bytes, shorter than a SQLite header)"
    if header[:16] != SQLITE_MAGIC:
        return "is not a SQLite database any more (its header is damaged)"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages, change, valid_for = struct.unpack(">I", header[28:32])[0], header[24:28], header[92:96]
    wal = Path(f"{path}-wal")
    # With a non-empty WAL the main file may lag its header until the next checkpoint: SQLite judges that.
    if page_size < 512 or page_size & (page_size - 1):
        return f"has a damaged header (page size {page_size})"
    if pages and change == valid_for and size < pages * page_size and not (wal.exists() and wal.stat().st_size):
        return f"is truncated ({size} bytes, where its header counts {pages} pages of {page_size} bytes)"
    return None


def _connect_ro(path: Path) -> sqlite3.Connection:
    # Read-only: a check never writes (not even a WAL checkpoint) into a file that may be damaged.
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)


def _integrity(path: Path) -> tuple[str | None, str | None, int]:
    """(problem, journal_id, highest number issued) of an existing, non-empty journal file."""
    problem = _file_problem(path)
    if problem:
        return problem, None, 0
    try:
        db = _connect_ro(path)
        try:
            found = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)").fetchall()]
            if found != ["ok"]:
                return f"is malformed (quick_check: {'; '.join(found)})", None, 0
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "results" not in names:
                return "holds no results table (it is not an appliance journal)", None, 0
            journal_id = None
            if "meta" in names:
                row = db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
                journal_id = str(row[0]) if row else None
            issued = db.execute(
                "SELECT MAX(COALESCE((SELECT MAX(seq) FROM results), 0), "
                "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'results'), 0))"
            ).fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as e:
        return f"cannot be read ({e})", None, 0
    return None, journal_id, int(issued)


def diagnose(path: Path, identity_dir: Path | None = None) -> Diagnosis:
    """Integrity (file, header, PRAGMA quick_check) and identity (against the marker and its copy in
    ``identity_dir``) of the journal."""
    try:
        marker = read_marker(path, identity_dir)
    except JournalDamaged as e:
        unreadable = e.message.removeprefix(f"The journal {path} ").split("; nothing was changed")[0]
        return Diagnosis("damaged", unreadable, None)
    which = (
        f"marker {marker_path(path).name}"
        if identity_dir is None or marker_path(path).exists()
        else f"marker's copy {copy_path(path, identity_dir)}"
    )
    said = f" (its {which} names journal {marker.journal_id}, #{marker.floor} issued)" if marker else ""
    if not path.exists():
        if marker is None:
            return Diagnosis("new", None, None)
        return Diagnosis("missing", "is missing" + said, marker)
    if path.stat().st_size == 0:
        # Even without a marker: a journal is never 0 bytes (a new one is made aside and renamed in).
        return Diagnosis("empty", "is empty (0 bytes)" + said, marker)
    problem, journal_id, issued = _integrity(path)
    if problem:
        return Diagnosis("damaged", problem, marker, journal_id, issued)
    if marker is None:
        return Diagnosis("adopt", None, None, journal_id, issued)
    if journal_id != marker.journal_id:
        other = f"journal {journal_id}" if journal_id else "a journal without identity"
        return Diagnosis("foreign", f"is another journal ({other}) than the one its marker names" + said, marker)
    if issued < marker.floor:
        return Diagnosis(
            "behind",
            f"holds sequence numbers up to #{issued} only, though #{marker.floor} were issued "
            "(an older copy, or its -wal file lost)",
            marker,
            journal_id,
            issued,
        )
    return Diagnosis("ok", None, marker, journal_id, issued)


def check(path: Path, identity_dir: Path | None = None) -> str | None:
    """None if the daemon may open the journal, else the refusal's sentence."""
    found = diagnose(path, identity_dir)
    return damaged_sentence(path, found.problem) if found.problem else None


# --- opening ------------------------------------------------------------------------------------------


def _create(path: Path) -> None:
    """A new journal is built under another name and renamed in whole: a journal is never seen empty."""
    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    Journal(tmp).close()
    rename_durably(tmp, path)


def open_journal(path: Path, identity_dir: Path | None = None) -> Journal:
    """Open the daemon's journal, refusing (JournalDamaged, one sentence) one that is missing, truncated,
    malformed, another one than the marker (or its copy in ``identity_dir``) names, or behind it; creates
    one where neither marker is found, or adopts one that has neither."""
    lock_fd = _lock(path)
    try:
        found = diagnose(path, identity_dir)
        if found.problem:
            raise JournalDamaged(damaged_sentence(path, found.problem))
        if found.kind == "new":
            log.info("a new journal %s (no marker beside it%s)", path, _copy_said(path, identity_dir))
            _create(path)
        journal = Journal(path)
        try:
            issued = journal.issued()
            if found.kind == "adopt":
                log.warning("the journal %s had no marker; adopting it (%d results issued)", path, issued)
            elif identity_dir is not None and found.marker is not None and not marker_path(path).exists():
                log.warning(
                    "the marker beside the journal %s was missing; its copy %s names this journal: written again",
                    path,
                    copy_path(path, identity_dir),
                )
            if identity_dir is not None and not copy_path(path, identity_dir).exists():
                log.info("keeping a copy of the journal's marker in %s", identity_dir)
            old_ceiling = found.marker.ceiling if found.marker else 0
            marker = Marker(journal.identity(), max(old_ceiling, issued + RESERVE), issued)
            write_marker(path, marker, identity_dir)
        except BaseException:
            journal.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    journal.set_reserve(MarkerReserve(path, marker, lock_fd, identity_dir))
    return journal


def _copy_said(path: Path, identity_dir: Path | None) -> str:
    return f" nor a copy in {identity_dir}" if identity_dir is not None else ""


# --- recovery -----------------------------------------------------------------------------------------


@dataclass
class Salvaged:
    journal_id: str | None = None
    sequence_record: int = 0
    inputs: list[tuple[Any, ...]] = field(default_factory=list)
    result_columns: list[str] = field(default_factory=lambda: list(_RESULT_COLUMNS))
    results: list[tuple[Any, ...]] = field(default_factory=list)
    input_columns: list[str] = field(default_factory=list)
    outbox_columns: list[str] = field(default_factory=list)  # empty: a journal from before the outbox
    outbox: list[tuple[Any, ...]] = field(default_factory=list)
    series_tables: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _repair_header(copy: Path) -> bool:
    """A zeroed or overwritten 100-byte header: write a plausible one (the pages behind it are intact)."""
    size = copy.stat().st_size
    wal = 2 if Path(f"{copy}-wal").exists() else 1
    for page_size in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
        if size % page_size:
            continue
        header = bytearray(100)
        header[:16] = SQLITE_MAGIC
        struct.pack_into(">HBBBBBB", header, 16, page_size & 0xFFFF or 1, wal, wal, 0, 64, 32, 32)
        struct.pack_into(">IIIIIII", header, 24, 1, size // page_size, 0, 0, 1, 4, 0)
        struct.pack_into(">IIIII", header, 52, 0, 1, SCHEMA_VERSION, 0, 0)
        major, minor, patch = sqlite3.sqlite_version_info
        struct.pack_into(">II", header, 92, 1, major * 1_000_000 + minor * 1000 + patch)
        with open(copy, "r+b") as f:
            f.write(header)
        try:
            with contextlib.closing(sqlite3.connect(copy)) as db:
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return True
        except sqlite3.Error:
            continue
    return False


def _read_table(
    db: sqlite3.Connection, table: str, columns: list[str], upper: int
) -> tuple[list[tuple[Any, ...]], int]:
    """Every readable row in rowid order, stepping over damaged pages by single-row lookups; also returns
    how many damaged stretches were stepped over."""
    cols = ", ".join(columns)
    rows: list[tuple[Any, ...]] = []
    last, skipped = 0, 0
    while True:
        try:
            for row in db.execute(f"SELECT rowid, {cols} FROM {table} WHERE rowid > ? ORDER BY rowid", (last,)):
                rows.append(tuple(row[1:]))
                last = int(row[0])
            return rows, skipped
        except sqlite3.DatabaseError:
            skipped += 1
        found = None
        for rowid in range(last + 1, upper + 1):
            try:
                found = db.execute(f"SELECT rowid, {cols} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if found is not None:
                break
        if found is None:
            return rows, skipped
        rows.append(tuple(found[1:]))
        last = int(found[0])


def _upper(db: sqlite3.Connection, table: str, *hints: int) -> int:
    for sql in (f"SELECT MAX(rowid) FROM {table}", f"SELECT rowid FROM {table} ORDER BY rowid DESC LIMIT 1"):
        try:
            row = db.execute(sql).fetchone()
            return max(int(row[0]) if row and row[0] is not None else 0, *hints)
        except sqlite3.DatabaseError:
            continue
    return max(*hints, 0) + 100_000  # the tail cannot be read: probe a generous range past what is known


def _salvage(aside: Path, work: Path) -> Salvaged:
    """Read what can be read, from a copy (the file kept aside is never written, not even by a checkpoint)."""
    out = Salvaged()
    copy = work / "salvage.sqlite3"
    shutil.copyfile(aside, copy)
    if Path(f"{aside}-wal").exists():
        shutil.copyfile(f"{aside}-wal", f"{copy}-wal")
    with open(copy, "rb") as f:
        if f.read(16) != SQLITE_MAGIC:
            if _repair_header(copy):
                out.notes.append("its header was damaged and was rebuilt on a copy to read the pages behind it")
            else:
                out.notes.append("its header was damaged and could not be rebuilt")
    try:
        db = sqlite3.connect(copy)
    except sqlite3.Error as e:
        out.notes.append(f"it could not be opened at all ({e})")
        return out
    with contextlib.closing(db):
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            out.notes.append(f"its schema could not be read ({e})")
            return out
        with contextlib.suppress(sqlite3.Error):
            row = db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
            out.journal_id = str(row[0]) if row else None
        with contextlib.suppress(sqlite3.Error):
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'results'").fetchone()
            out.sequence_record = int(row[0]) if row else 0
        try:
            present = {r[1] for r in db.execute("PRAGMA table_info(results)")}
            # Before schema 3 a row had no payload_version: its payload is version 1, the column's default; before 5
            # no series.
            out.result_columns = [c for c in _RESULT_COLUMNS if c in present or c not in _NEWER_RESULT_COLUMNS]
            upper = _upper(db, "results", out.sequence_record)
            out.results, bad = _read_table(db, "results", out.result_columns, upper)
            if bad:
                out.notes.append(f"{bad} damaged stretch(es) of results were stepped over")
        except sqlite3.Error as e:
            out.notes.append(f"no result could be read ({e})")
        try:
            present = {r[1] for r in db.execute("PRAGMA table_info(inputs)")}
            out.input_columns = [c for c in _INPUT_COLUMNS if c in present or _RENAMED.get(c) in present]
            source = [c if c in present else _RENAMED[c] for c in out.input_columns]
            hint = max((int(r[1]) for r in out.results), default=0)
            out.inputs, bad = _read_table(db, "inputs", source, _upper(db, "inputs", hint))
            if bad:
                out.notes.append(f"{bad} damaged stretch(es) of inputs were stepped over")
        except sqlite3.Error as e:
            out.notes.append(f"no input could be read ({e})")
        try:
            present = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
            if present:
                columns = [c for c in _OUTBOX_COLUMNS if c in present]
                out.outbox, bad = _read_table(db, "outbox", columns, _upper(db, "outbox", 0))
                out.outbox_columns = columns
                if bad:
                    out.notes.append(
                        f"{bad} damaged stretch(es) of the outbox were stepped over: reports stored there "
                        "never reach the PACS"
                    )
        except sqlite3.Error as e:
            out.notes.append(f"no report waiting for the PACS could be read ({e})")
        for table, columns in _SERIES_TABLES.items():
            try:
                if {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                    rows, bad = _read_table(db, table, columns, _upper(db, table, 0))
                    out.series_tables[table] = rows
                    if bad:
                        out.notes.append(f"{bad} damaged stretch(es) of {table} were stepped over")
            except sqlite3.Error as e:
                out.notes.append(f"no row of {table} could be read ({e})")
    return out


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # The -wal holds committed transactions: it travels with its database, under the matching name.
    for suffix in ("-wal", "-shm", ""):
        part = Path(f"{path}{suffix}")
        if part.exists():
            os.replace(part, f"{aside}{suffix}")
    sync_folder(path.parent)
    return aside


def recover(path: Path, identity_dir: Path | None = None) -> list[str]:
    """Set a refused journal aside (kept, timestamped), salvage its readable rows into a new journal whose
    numbers continue after the marker's ceiling (the higher of the marker and its copy in ``identity_dir``),
    and say what was kept and what was lost."""
    lock_fd = _lock(path)
    try:
        return _recover(path, identity_dir)
    finally:
        os.close(lock_fd)


def _recover(path: Path, identity_dir: Path | None) -> list[str]:
    found = diagnose(path, identity_dir)
    if found.problem is None:
        return [f"ok: the journal {path} is sound; nothing to recover"]
    lines = [f"problem: the journal {path} {found.problem}"]
    marker = found.marker  # None when there is none or it cannot be read
    data = Salvaged()
    if path.exists():
        aside = _move_aside(path)
        lines.append(f"kept: the refused journal is now {aside}")
        if found.kind != "foreign":
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".salvage-") as work:
                data = _salvage(aside, Path(work))
            lines += [f"note: {n}" for n in data.notes]
    found_top = max(data.sequence_record, max((int(r[0]) for r in data.results), default=0))
    foreign = found.kind == "foreign" or (
        marker is not None and data.journal_id is not None and data.journal_id != marker.journal_id
    )
    if foreign:
        lines.append("not imported: it is another journal, whose numbers mean other results; it stays aside")
        data = Salvaged()
    if marker is not None:
        start_after = max(marker.ceiling, found_top)
        why = "the marker's ceiling, above every number issued"
    else:
        start_after = found_top + RESERVE
        why = f"no readable marker: {RESERVE} past the highest number found, to be safe"

    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    fresh = Journal(tmp)
    new_id = fresh.identity()
    fresh.close()
    failed = 0
    with contextlib.closing(sqlite3.connect(tmp, isolation_level=None)) as db:
        # Foreign keys stay off: a result whose input row was lost is still kept (its number was seen).
        db.execute("BEGIN")
        if data.input_columns:
            cols = ", ".join(data.input_columns)
            marks = ", ".join("?" * len(data.input_columns))
            db.executemany(f"INSERT OR IGNORE INTO inputs ({cols}) VALUES ({marks})", data.inputs)
        db.executemany(
            f"INSERT OR IGNORE INTO results ({', '.join(data.result_columns)}) "
            f"VALUES ({', '.join('?' * len(data.result_columns))})",
            data.results,
        )
        if data.outbox_columns:
            # Kept even where their result was lost: a report stands alone, and the PACS still expects it.
            db.executemany(
                f"INSERT OR IGNORE INTO outbox ({', '.join(data.outbox_columns)}) "
                f"VALUES ({', '.join('?' * len(data.outbox_columns))})",
                data.outbox,
            )
        for table, rows in data.series_tables.items():
            columns = _SERIES_TABLES[table]
            db.executemany(
                f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows
            )
        # Finished inputs whose every result was lost count as failed: the same content dropped again is
        # scored again instead of being called a duplicate of a result nobody can read.
        failed = db.execute(
            "UPDATE inputs SET state = 'failed' WHERE state IN ('scored', 'rejected') "
            "AND id NOT IN (SELECT input_id FROM results WHERE input_id IS NOT NULL)"  # series results have none
        ).rowcount
        if db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'results'", (start_after,)).rowcount == 0:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('results', ?)", (start_after,))
        db.execute("INSERT INTO meta (key, value) VALUES ('continued_after', ?)", (str(start_after),))
        db.execute("COMMIT")
        kept_inputs = db.execute("SELECT COUNT(*) FROM inputs").fetchone()[0]
        kept_results = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        queued = db.execute("SELECT COUNT(*) FROM inputs WHERE state = 'queued'").fetchone()[0]
        top_kept = db.execute("SELECT COALESCE(MAX(seq), 0) FROM results").fetchone()[0]
        top_input = db.execute("SELECT COALESCE(MAX(id), 0) FROM inputs").fetchone()[0]
        outbox = dict(db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
    rename_durably(tmp, path)
    write_marker(path, Marker(new_id, start_after + RESERVE, start_after), identity_dir)

    lines.append(
        f"salvaged: {kept_inputs} inputs ({queued} still queued: scored at the next start, their files are "
        f"still in the watch folder or spool) and {kept_results} results"
        + (f" (up to #{top_kept})" if kept_results else "")
    )
    lost_results = max(top_kept - kept_results, 0) + max((marker.floor if marker else 0) - top_kept, 0)
    lost_inputs = max(top_input - kept_inputs, 0)
    if outbox:
        lines.append(
            f"outbox: {sum(outbox.values())} DICOM objects for the PACS kept ({outbox.get('pending', 0)} still to "
            f"send, {outbox.get('delivered', 0)} delivered, {outbox.get('refused', 0)} refused)"
        )
    if lost_results or lost_inputs or failed or (marker and marker.floor and not kept_results):
        lines.append(
            f"lost: at least {lost_results} results and {lost_inputs} input rows could not be read; files already "
            "moved to the processed or rejected folder whose rows were lost are not scored again (drop a copy "
            "into the watch folder to score one again); files still in the watch folder are taken as new inputs"
        )
    if failed:
        lines.append(
            f"marked failed: {failed} finished inputs whose results were lost (a copy dropped again is scored)"
        )
    lines.append(f"numbering: new results continue after #{start_after} ({why}); the new journal is {new_id}")
    return lines
