-- Models without a route of their own that an owner's uploads named: the default route serves them, and
-- `GET /v1/models` lists them to that owner only (a tenant's model names are private). Written by an upload, in its
-- transaction, once per model of the file (never by the daemons); a model keeps the time it was first seen.
-- The owner's listing reads the most recently first seen: `models_seen_recent`. An admin's listing (every owner's,
-- each model once) reads the whole table, which holds a few rows per owner and model.

CREATE TABLE models_seen (
    owner         text        NOT NULL,
    model         text        NOT NULL,
    first_seen_at timestamptz NOT NULL,
    PRIMARY KEY (owner, model)
);
CREATE INDEX models_seen_recent ON models_seen (owner, first_seen_at);
