"""Retention on SQLite: hard-delete what was soft-deleted, and uploads abandoned by a crash, a bounded number of
rows per call."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Final

from fusillade.storage.sqlite import uploads

# In order; each step deletes at most the budget left by the previous ones.
PURGE_STEPS: Final = (
    # Requests of deleted batches.
    """
    DELETE FROM requests WHERE rowid IN (
        SELECT r.rowid FROM batches AS b JOIN requests AS r ON r.batch_id = b.id
        WHERE b.deleted_at IS NOT NULL LIMIT ?
    )
    """,
    # The output and error files of deleted batches that have no requests left.
    """
    DELETE FROM files WHERE rowid IN (
        SELECT f.rowid FROM batches AS b CROSS JOIN files AS f ON f.batch_id = b.id
        WHERE b.deleted_at IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM requests AS r WHERE r.batch_id = b.id)
        LIMIT ?
    )
    """,
    # Deleted batches with nothing left.
    """
    DELETE FROM batches WHERE rowid IN (
        SELECT b.rowid FROM batches AS b
        WHERE b.deleted_at IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM requests AS r WHERE r.batch_id = b.id)
            AND NOT EXISTS (SELECT 1 FROM files AS f WHERE f.batch_id = b.id)
        LIMIT ?
    )
    """,
    # Templates of deleted input files that no live batch uses (a finished batch may still be retried).
    """
    DELETE FROM request_templates WHERE rowid IN (
        SELECT t.rowid FROM files AS f JOIN request_templates AS t ON t.file_id = f.id
        WHERE f.deleted_at IS NOT NULL AND f.batch_id IS NULL
            AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.input_file_id = f.id AND b.deleted_at IS NULL)
        LIMIT ?
    )
    """,
    # Deleted input files with no templates left.
    """
    DELETE FROM files WHERE rowid IN (
        SELECT f.rowid FROM files AS f
        WHERE f.deleted_at IS NOT NULL AND f.batch_id IS NULL
            AND NOT EXISTS (SELECT 1 FROM request_templates AS t WHERE t.file_id = f.id)
        LIMIT ?
    )
    """,
)


def purge_deleted(connection: sqlite3.Connection, now: datetime, *, limit: int) -> int:
    deleted = 0
    for sql in PURGE_STEPS:
        if deleted >= limit:
            break
        deleted += connection.execute(sql, (limit - deleted,)).rowcount
    if deleted < limit:
        deleted += uploads.purge_abandoned(connection, now, limit=limit - deleted)
    return deleted
