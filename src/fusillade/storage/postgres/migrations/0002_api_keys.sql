-- Bearer keys of the HTTP API. Only the hex SHA-256 of a key is stored, never the key: a copy of the database
-- gives no key that works. `prefix` (the key's first characters) lets people recognise a key in listings.
--
-- Every API request looks its key up by hash: the UNIQUE constraint's index makes that one indexed read, and
-- also refuses a second key with the same hash (even when two processes create keys at once). Revoked keys keep
-- their row (`revoked_at` set) so listings show them; the lookup skips them with a filter on the one row it
-- finds, so no partial index is needed.
-- Listings (an operator's command, rare) read the whole table, which holds a few rows per user: no index.

CREATE TABLE api_keys (
    id         uuid        PRIMARY KEY,
    owner      text        NOT NULL,
    name       text        NOT NULL,
    key_hash   text        NOT NULL UNIQUE,
    prefix     text        NOT NULL,
    admin      boolean     NOT NULL,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
