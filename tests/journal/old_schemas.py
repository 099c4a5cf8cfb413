"""Journals as earlier releases wrote them, verbatim, for the upgrade tests."""

# Schema version 2 (up to the rooms' redesign): only two sources; every payload an appliance.v1.Result.
SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS inputs (
    id              INTEGER PRIMARY KEY,
    source          TEXT NOT NULL CHECK (source IN ('folder', 'grpc')),
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

-- The journal's identity (journal_id, created_ms), matched at start against the marker file beside it.
CREATE TABLE IF NOT EXISTS meta (
    key             TEXT PRIMARY KEY,
    value           TEXT NOT NULL
);
"""

# Schema version 1 (0.1.0): version 2 with the content column under its old name.
SCHEMA_1 = SCHEMA_2.replace("content_hash", "content_sha256")

# Schema version 3 (issue 11's rooms): any source, versioned payloads; no instance UIDs, no outbox yet.
SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS inputs (
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
    payload         BLOB NOT NULL,    -- the result without its sequence (appliance.journal.payload)
    created_ms      INTEGER NOT NULL,
    payload_version INTEGER NOT NULL DEFAULT 1,  -- the payload's format: appliance.journal.payload.VERSION
    UNIQUE (input_id, frame_index)    -- a frame is scored once, whatever happens
);
CREATE INDEX IF NOT EXISTS results_by_sop ON results(sop_uid);

-- The journal's identity (journal_id, created_ms), matched at start against the marker file beside it.
CREATE TABLE IF NOT EXISTS meta (
    key             TEXT PRIMARY KEY,
    value           TEXT NOT NULL
);
"""

# Schema version 4 (instance UIDs and the outbox to the PACS): every result needs an input; no series yet.
SCHEMA_4 = """CREATE TABLE IF NOT EXISTS inputs (
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
    updated_ms      INTEGER NOT NULL,
    instance_uid    TEXT              -- a DICOM instance's SOP Instance UID, where the way in knows it up front
);
-- One scored (or queued, or rejected) input per content: a second drop becomes a 'duplicate' row.
-- 'failed' (a transient failure: the backend, a vanished file) does not count: the same content may be retried.
CREATE UNIQUE INDEX IF NOT EXISTS inputs_one_per_content ON inputs(content_hash)
    WHERE state NOT IN ('duplicate', 'failed');
-- And one per DICOM instance: the same instance sent again in another encoding (other bytes) is a duplicate
-- of one queued or scored; a rejection judged those bytes, so other bytes of the instance are tried.
CREATE UNIQUE INDEX IF NOT EXISTS inputs_one_per_instance ON inputs(instance_uid)
    WHERE instance_uid IS NOT NULL AND state IN ('queued', 'scored');
CREATE INDEX IF NOT EXISTS inputs_by_state ON inputs(state);
CREATE INDEX IF NOT EXISTS inputs_by_file ON inputs(path, size, mtime_ns);

CREATE TABLE IF NOT EXISTS results (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the stream's resume point
    input_id        INTEGER NOT NULL REFERENCES inputs(id),
    frame_index     INTEGER NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('scored', 'rejected')),
    sop_uid         TEXT NOT NULL DEFAULT '',
    payload         BLOB NOT NULL,    -- the result without its sequence (appliance.journal.payload)
    created_ms      INTEGER NOT NULL,
    payload_version INTEGER NOT NULL DEFAULT 1,  -- the payload's format: appliance.journal.payload.VERSION
    UNIQUE (input_id, frame_index)    -- a frame is scored once, whatever happens
);
CREATE INDEX IF NOT EXISTS results_by_sop ON results(sop_uid);

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
