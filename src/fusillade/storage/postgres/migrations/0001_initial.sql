-- fusillade PostgreSQL schema, version 1.
--
-- No foreign keys on the big tables (templates, requests): rows are inserted in bulk and purged in a fixed
-- order by `purge_deleted`; a referential check would add a lookup per inserted row.
--
-- `requests` is the hot table: a request is claimed, marked processing and completed, each a row update.
-- - Changing `state` changes indexed columns (partial index predicates), so those updates write a new entry in
--   every index: the table keeps few indexes.
-- - claimed and processing are stored as one `state`, `in_flight`, told apart by `started_at` (not indexed):
--   marking a request processing is then a HOT update, in place, with no index entries, if its page has room;
--   fillfactor keeps room on every page for it.
-- - The claim walks the head of `requests_claim`, where the entries of claimed rows stay until VACUUM removes
--   them (nothing is inserted there that would clean them up), so each claim pays for the rows claimed since
--   the last vacuum: daemons vacuum this table every second or so (`maintain_queue`), and the storage
--   parameters below make autovacuum, where it is on, visit it often. No truncation at the end of a vacuum:
--   it would need a lock that stops claims, for space that the next batch reuses anyway.

CREATE TABLE files (
    id              uuid        PRIMARY KEY,
    owner           text        NOT NULL,
    filename        text        NOT NULL,
    purpose         text        NOT NULL CHECK (purpose IN ('batch', 'batch_output', 'batch_error')),
    size_bytes      bigint      NOT NULL DEFAULT 0,
    request_count   integer     NOT NULL DEFAULT 0,
    batch_id        uuid,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    deleted_at      timestamptz
);

CREATE INDEX files_owner_created ON files (owner, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX files_created ON files (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX files_deleted ON files (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX files_batch ON files (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE request_templates (
    id              uuid        PRIMARY KEY,
    file_id         uuid        NOT NULL,
    line_number     integer     NOT NULL,
    custom_id       text        NOT NULL,
    custom_id_bytes integer     NOT NULL,
    method          text        NOT NULL,
    url             text        NOT NULL,
    model           text        NOT NULL,
    body            text        NOT NULL,
    UNIQUE (file_id, line_number)
);

CREATE TABLE batches (
    id                uuid        PRIMARY KEY,
    owner             text        NOT NULL,
    input_file_id     uuid        NOT NULL,
    output_file_id    uuid        NOT NULL,
    error_file_id     uuid        NOT NULL,
    endpoint          text        NOT NULL,
    completion_window text        NOT NULL,
    metadata          jsonb,
    idempotency_key   text,
    total_requests    integer     NOT NULL,
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz NOT NULL,
    in_progress_at    timestamptz,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz,
    deleted_at        timestamptz,
    errors            jsonb
);

-- A deleted batch frees its key (deleted objects are invisible).
CREATE UNIQUE INDEX batches_idempotency ON batches (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND deleted_at IS NULL;
CREATE INDEX batches_owner_created ON batches (owner, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX batches_created ON batches (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX batches_input_file ON batches (input_file_id);
CREATE INDEX batches_unfinished ON batches (expires_at)
    WHERE completed_at IS NULL AND failed_at IS NULL AND expired_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX batches_deleted ON batches (deleted_at) WHERE deleted_at IS NOT NULL;

CREATE TABLE requests (
    id              uuid        PRIMARY KEY,
    batch_id        uuid        NOT NULL,
    template_id     uuid        NOT NULL,
    line_number     integer     NOT NULL,
    attempt         integer     NOT NULL DEFAULT 0,
    custom_id_bytes integer     NOT NULL,
    response_status integer,
    result_bytes    bigint      NOT NULL DEFAULT 0,
    deadline        timestamptz NOT NULL,
    not_before      timestamptz,
    claimed_at      timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    daemon_id       uuid,
    -- `in_flight` is the domain's claimed (started_at NULL) or processing (started_at set); see below.
    state           text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'in_flight', 'completed', 'failed', 'canceled')),
    owner           text        NOT NULL,
    model           text        NOT NULL,
    custom_id       text        NOT NULL,
    error_code      text,
    error_message   text,
    response_body   text
) WITH (
    fillfactor = 70,
    vacuum_index_cleanup = on,
    vacuum_truncate = off,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim walks this index per model in deadline order; the fair claim (owners with fewer requests in
-- flight first) walks the second per owner. Both hold pending rows only, so claims and results never add to them.
CREATE INDEX requests_claim ON requests (model, deadline, batch_id, line_number) WHERE state = 'pending';
CREATE INDEX requests_claim_by_owner ON requests (model, owner, deadline, batch_id, line_number)
    WHERE state = 'pending';
-- In flight: per-model counts for global limits, per-daemon lookups (cancelling, reclaim). Small by nature.
CREATE INDEX requests_in_flight ON requests (model, daemon_id) WHERE state = 'in_flight';
-- Counts per state, listings in input order (one range per state, merged), cancel/expire/retry of a batch.
CREATE INDEX requests_batch_state ON requests (batch_id, state, line_number);
-- Output and error files in completion order.
CREATE INDEX requests_output ON requests (batch_id, finished_at, id) WHERE state = 'completed';
CREATE INDEX requests_errors ON requests (batch_id, finished_at, id) WHERE state IN ('failed', 'canceled');

CREATE TABLE daemons (
    id              uuid        PRIMARY KEY,
    hostname        text        NOT NULL,
    pid             integer     NOT NULL,
    version         text        NOT NULL,
    config          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status          text        NOT NULL CHECK (status IN ('running', 'dead')),
    started_at      timestamptz NOT NULL,
    last_heartbeat  timestamptz NOT NULL,
    stopped_at      timestamptz,
    in_flight       integer     NOT NULL DEFAULT 0
);

CREATE INDEX daemons_running ON daemons (last_heartbeat) WHERE status = 'running';
