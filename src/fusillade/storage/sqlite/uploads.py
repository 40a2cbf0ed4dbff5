"""Uploads on SQLite, stored in short steps (see migrations/0005): `begin`, template chunks
(`files.insert_templates`), then `finish` or `abandon`; `purge_abandoned` for the crashed ones."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Final

from fusillade.domain import ids, models
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite import files, models_seen

ABANDONED_AFTER: Final = timedelta(hours=1)
"""An upload still unfinished this long after it began was abandoned (its process died): purge removes it."""
DELETE_ROWS: Final = 5000
"""Templates deleted per transaction when an upload is abandoned."""

_BEGIN = "INSERT INTO uploads_in_progress (file_id, started_at) VALUES (?, ?)"
_END = "DELETE FROM uploads_in_progress WHERE file_id = ?"
_DELETE_TEMPLATES = """
DELETE FROM request_templates WHERE rowid IN (
    SELECT rowid FROM request_templates WHERE file_id = ? LIMIT ?
)
"""
_DELETE_ABANDONED_TEMPLATES = """
DELETE FROM request_templates WHERE rowid IN (
    SELECT t.rowid FROM uploads_in_progress AS u JOIN request_templates AS t ON t.file_id = u.file_id
    WHERE u.started_at < ? LIMIT ?
)
"""
_DELETE_ABANDONED = """
DELETE FROM uploads_in_progress WHERE rowid IN (
    SELECT u.rowid FROM uploads_in_progress AS u
    WHERE u.started_at < ? AND NOT EXISTS (SELECT 1 FROM request_templates AS t WHERE t.file_id = u.file_id)
    LIMIT ?
)
"""


def begin(connection: sqlite3.Connection, now: datetime, *, file_id: ids.FileId) -> None:
    connection.execute(_BEGIN, (file_id.bytes, connections.to_micros(now)))


def finish(
    connection: sqlite3.Connection,
    now: datetime,
    *,
    file_id: ids.FileId,
    owner: str,
    filename: str,
    size_bytes: int,
    request_count: int,
    expires_at: datetime | None,
    seen: Iterable[str],
) -> models.File:
    """The last step: the file row (its templates become visible with it), the models seen, the end."""
    found = sorted(seen)
    if found:
        models_seen.record_seen(connection, now, owner=owner, found=found)
    file = files.insert_input_file(
        connection,
        now,
        file_id=file_id,
        owner=owner,
        filename=filename,
        size_bytes=size_bytes,
        request_count=request_count,
        expires_at=expires_at,
    )
    connection.execute(_END, (file_id.bytes,))
    return file


def abandon_step(connection: sqlite3.Connection, now: datetime, *, file_id: ids.FileId) -> bool:
    """Delete up to `DELETE_ROWS` templates of a failed upload; at the last, its row. True when done."""
    if connection.execute(_DELETE_TEMPLATES, (file_id.bytes, DELETE_ROWS)).rowcount == DELETE_ROWS:
        return False
    connection.execute(_END, (file_id.bytes,))
    return True


def purge_abandoned(connection: sqlite3.Connection, now: datetime, *, limit: int) -> int:
    """Rows of uploads abandoned more than `ABANDONED_AFTER` ago removed, at most `limit`."""
    cutoff = connections.to_micros(now - ABANDONED_AFTER)
    deleted = connection.execute(_DELETE_ABANDONED_TEMPLATES, (cutoff, limit)).rowcount
    if deleted < limit:
        deleted += connection.execute(_DELETE_ABANDONED, (cutoff, limit - deleted)).rowcount
    return deleted
