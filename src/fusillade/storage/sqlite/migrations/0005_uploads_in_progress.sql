-- An upload is stored in several short write transactions, so that the database's one write lock is never held
-- for long (a daemon needs it every few milliseconds): its templates first, a chunk at a time, then its file
-- row. Until that last step the upload is listed here and its templates are invisible (no file row names them).
-- A failed upload deletes its templates and its row at once; one abandoned by a crash is removed by
-- `purge_deleted` once it is older than an hour.
CREATE TABLE uploads_in_progress (
    file_id    BLOB PRIMARY KEY,
    started_at INTEGER NOT NULL
);
