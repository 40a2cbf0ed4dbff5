-- Bearer keys of the HTTP API. Only the hex SHA-256 of a key is stored, never the key: a copy of the database
-- gives no key that works. `prefix` (the key's first characters) lets people recognise a key in listings.
--
-- Every API request looks its key up by hash: the UNIQUE constraint's index makes that one indexed read, and
-- also refuses a second key with the same hash. Revoked keys keep their row (`revoked_at` set) so listings show
-- them; the lookup skips them with a filter on the one row it finds, so no partial index is needed.
-- Listings (an operator's command, rare) read the whole table, which holds a few rows per user: no index.
-- `admin` is 0 or 1 (SQLite has no boolean type).

CREATE TABLE api_keys (
    id         BLOB PRIMARY KEY,
    owner      TEXT NOT NULL,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    prefix     TEXT NOT NULL,
    admin      INTEGER NOT NULL CHECK (admin = 0 OR admin = 1),
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
