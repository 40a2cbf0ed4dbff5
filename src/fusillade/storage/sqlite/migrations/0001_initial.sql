-- The fusillade schema on SQLite. Ids are UUIDs as 16-byte BLOBs; times are INTEGER microseconds since the
-- Unix epoch (UTC); JSON documents are TEXT.

CREATE TABLE files (
    id            BLOB PRIMARY KEY,
    owner         TEXT NOT NULL,
    filename      TEXT NOT NULL,
    purpose       TEXT NOT NULL CHECK (purpose = 'batch' OR purpose = 'batch_output' OR purpose = 'batch_error'),
    size_bytes    INTEGER NOT NULL DEFAULT 0,
    request_count INTEGER NOT NULL DEFAULT 0,
    batch_id      BLOB,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    deleted_at    INTEGER
);
CREATE INDEX files_owner_listing ON files (owner, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX files_listing ON files (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX files_batch ON files (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX files_deleted ON files (deleted_at) WHERE deleted_at IS NOT NULL;

CREATE TABLE request_templates (
    id              BLOB PRIMARY KEY,
    file_id         BLOB NOT NULL,
    line_number     INTEGER NOT NULL,
    custom_id       TEXT NOT NULL,
    custom_id_bytes INTEGER NOT NULL,
    method          TEXT NOT NULL,
    url             TEXT NOT NULL,
    model           TEXT NOT NULL,
    body            TEXT NOT NULL,
    UNIQUE (file_id, line_number)
);

CREATE TABLE batches (
    id                BLOB PRIMARY KEY,
    owner             TEXT NOT NULL,
    input_file_id     BLOB NOT NULL,
    output_file_id    BLOB NOT NULL,
    error_file_id     BLOB NOT NULL,
    endpoint          TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata          TEXT,
    idempotency_key   TEXT,
    total_requests    INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    in_progress_at    INTEGER,
    finalizing_at     INTEGER,
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER,
    deleted_at        INTEGER,
    errors            TEXT
);
CREATE UNIQUE INDEX batches_idempotency ON batches (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX batches_owner_listing ON batches (owner, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX batches_listing ON batches (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX batches_unfinished ON batches (expires_at)
    WHERE completed_at IS NULL AND failed_at IS NULL AND expired_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX batches_input_file ON batches (input_file_id);
CREATE INDEX batches_deleted ON batches (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX batches_cancelling ON batches (cancelling_at) WHERE cancelling_at IS NOT NULL AND cancelled_at IS NULL;

CREATE TABLE requests (
    id              BLOB PRIMARY KEY,
    batch_id        BLOB NOT NULL,
    template_id     BLOB NOT NULL,
    owner           TEXT NOT NULL,
    custom_id       TEXT NOT NULL,
    custom_id_bytes INTEGER NOT NULL,
    model           TEXT NOT NULL,
    line_number     INTEGER NOT NULL,
    deadline        INTEGER NOT NULL,
    -- ORs, not IN: SQLite builds a temporary table for an IN list of more than two values at every execution.
    state           TEXT NOT NULL CHECK (
        state = 'pending' OR state = 'claimed' OR state = 'processing'
        OR state = 'completed' OR state = 'failed' OR state = 'canceled'
    ),
    attempt         INTEGER NOT NULL DEFAULT 0,
    not_before      INTEGER,
    daemon_id       BLOB,
    claimed_at      INTEGER,
    started_at      INTEGER,
    finished_at     INTEGER,
    response_status INTEGER,
    response_body   TEXT,
    error_code      TEXT,
    error_message   TEXT,
    result_bytes    INTEGER NOT NULL DEFAULT 0
);
-- Indexes are chosen so that `claimed -> processing`, the most frequent write, changes no index entry.
-- Invariant kept by every write: a request is in flight (claimed or processing) exactly when
-- `claimed_at IS NOT NULL AND finished_at IS NULL` (going back to pending clears claimed_at; every terminal
-- state sets finished_at). The in-flight indexes use that condition instead of the state.
-- The claim walks this index in order: earliest deadline, then batch, then input line.
CREATE INDEX requests_claim ON requests (model, deadline, batch_id, line_number) WHERE state = 'pending';
CREATE INDEX requests_in_flight_model ON requests (model) WHERE claimed_at IS NOT NULL AND finished_at IS NULL;
CREATE INDEX requests_in_flight_batch ON requests (batch_id)
    WHERE claimed_at IS NOT NULL AND finished_at IS NULL;
-- Requests not in flight, per batch and state: counts (in flight = total - these), and the output and error
-- files in completion order with their sizes.
CREATE INDEX requests_settled ON requests (batch_id, state, finished_at, result_bytes)
    WHERE state NOT IN ('claimed', 'processing');
CREATE UNIQUE INDEX requests_batch_line ON requests (batch_id, line_number);

CREATE TABLE daemons (
    id             BLOB PRIMARY KEY,
    hostname       TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    version        TEXT NOT NULL,
    config         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'dead')),
    started_at     INTEGER NOT NULL,
    last_heartbeat INTEGER NOT NULL,
    stopped_at     INTEGER,
    in_flight      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX daemons_running ON daemons (last_heartbeat) WHERE status = 'running';
