-- Token usage of completed requests, summed: one row per batch, model, day (UTC, of the completion) and daemon
-- that wrote it. A daemon adds to its own rows in the transaction of its writes (the tick's group commit), only
-- for the `Complete` writes that applied, so a request sent twice (a crash, a reclaim) counts once: the result
-- kept. Reading a batch's usage sums its few rows, never its requests. Rows outlive their batch's purge: they are
-- the owner's spending history (`fusillade usage`).
CREATE TABLE batch_usage (
    batch_id         BLOB    NOT NULL,
    model            TEXT    NOT NULL,
    day              INTEGER NOT NULL,  -- days since 1970-01-01 (UTC)
    daemon_id        BLOB    NOT NULL,
    owner            TEXT    NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,  -- completed requests with known usage
    unknown          INTEGER NOT NULL DEFAULT 0,  -- completed requests whose response carried no usage
    input_tokens     INTEGER NOT NULL DEFAULT 0,
    cached_tokens    INTEGER NOT NULL DEFAULT 0,
    output_tokens    INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, model, day, daemon_id)
) WITHOUT ROWID;
CREATE INDEX batch_usage_owner_day ON batch_usage (owner, day);

-- The model every request of a batch names, set at its creation; NULL when its input file mixes models.
ALTER TABLE batches ADD COLUMN model TEXT;
