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
--   the last vacuum: daemons vacuum this table once 5% of it changed (`maintain_queue`, called every second
--   or so), and the storage parameters below make autovacuum, where it is on, visit it often. No truncation at
--   the end of a vacuum: it would need a lock that stops claims, for space that the next batch reuses anyway.
-- - `state`, `owner` and `model` compare bytewise (COLLATE "C"): they are keys of the hot indexes, and no
--   listing sorts by them, so the database's linguistic collation would only slow every index step.

-- Time-ordered ids for rows inserted together (templates of an upload, requests of a batch), in the layout of
-- UUID version 7 (RFC 9562): the statement's milliseconds and 12 random bits (`head`), then a 62-bit counter from
-- a random `start`, advanced by the row's line number. A batch's requests are claimed and written in input
-- order, so their writes by id, and the claim's lookups of templates by id, touch neighbouring primary-key pages
-- instead of one random page per row (which, once the tables outgrow the buffer cache, is a read per row).
CREATE FUNCTION ordered_uuid_seed(OUT head bigint, OUT start bigint)
LANGUAGE sql VOLATILE
AS $$
    SELECT (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16) | 28672  -- version 7
               | floor(random() * 4096)::bigint,
           floor(random() * 2 ^ 60)::bigint
$$;

CREATE FUNCTION ordered_uuid(head bigint, counter bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (lpad(to_hex(head), 16, '0') || to_hex(counter | (-9223372036854775808)::bigint))::uuid  -- variant 10
$$;

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
    state           text        COLLATE "C" NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'in_flight', 'completed', 'failed', 'canceled')),
    owner           text        COLLATE "C" NOT NULL,
    model           text        COLLATE "C" NOT NULL,
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
-- In flight: per-model counts for global limits, per-daemon lookups (cancelling, reclaim), a batch's in-flight
-- requests (requests_batch_state leaves them out). Small by nature.
CREATE INDEX requests_in_flight ON requests (model, daemon_id) WHERE state = 'in_flight';
-- Counts per state, listings in input order (one range per state, merged), cancel/expire/retry of a batch.
-- Without in-flight requests, so that a claim adds no entry here (requests_in_flight has them): queries that need
-- them too look there, and a batch's in-flight count is its total minus the other states.
CREATE INDEX requests_batch_state ON requests (batch_id, state, line_number) WHERE state <> 'in_flight';
-- Output and error files in completion order.
CREATE INDEX requests_output ON requests (batch_id, finished_at, id) WHERE state = 'completed';
CREATE INDEX requests_errors ON requests (batch_id, finished_at, id) WHERE state IN ('failed', 'canceled');

-- The claim, `claim_requests`, is not created here: it is defined once, in `functions/claim_requests.sql`,
-- which `migrate` installs after the migrations (see `migration.py`). Version 1 of it was written here.

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
