-- Token usage of completed requests, summed: one row per batch, model, day (UTC, of the completion), daemon and
-- database session (`shard`: the backend's pid) that wrote it. A daemon adds to its own rows in the statement of
-- its writes (the tick's one trip), only for the `Complete` writes that applied, so a request sent twice (a crash,
-- a reclaim) counts once: the result kept. Rows per daemon and session: neither replicas nor a daemon's own ticks
-- in flight (each on its own pooled connection) ever wait on each other's row lock. Reading a batch's usage sums
-- its few rows, never its requests. Rows outlive their batch's purge: they are the owner's spending history
-- (`fusillade usage`).
CREATE TABLE batch_usage (
    batch_id         uuid    NOT NULL,
    model            text    COLLATE "C" NOT NULL,
    day              date    NOT NULL,
    daemon_id        uuid    NOT NULL,
    shard            integer NOT NULL,
    owner            text    COLLATE "C" NOT NULL,
    requests         bigint  NOT NULL DEFAULT 0,  -- completed requests with known usage
    unknown          bigint  NOT NULL DEFAULT 0,  -- completed requests whose response carried no usage
    input_tokens     bigint  NOT NULL DEFAULT 0,
    cached_tokens    bigint  NOT NULL DEFAULT 0,
    output_tokens    bigint  NOT NULL DEFAULT 0,
    reasoning_tokens bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, model, day, daemon_id, shard)
);
CREATE INDEX batch_usage_owner_day ON batch_usage (owner, day);

-- The model every request of a batch names, set at its creation; NULL when its input file mixes models.
ALTER TABLE batches ADD COLUMN model text;
