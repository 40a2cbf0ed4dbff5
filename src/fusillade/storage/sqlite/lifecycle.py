"""Batch lifecycle on SQLite: cancel, retry of failed requests, soft delete, expiry and finalization (the same
operations as `postgres/lifecycle.py`). Functions take a connection inside an open transaction; the request
states each operation moves are rows of `domain.transitions`."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from typing import Final

from fusillade import errors
from fusillade.domain import ids, lines, models, transitions
from fusillade.storage import refusals
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite import files, rows
from fusillade.storage.sqlite.batches import batch_from_row, get_batch, visible_batch_row

_UNFINISHED: Final = "completed_at IS NULL AND failed_at IS NULL AND expired_at IS NULL AND cancelled_at IS NULL"

CANCEL_PENDING = f"""
UPDATE requests SET state = 'canceled', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE batch_id = ? AND {rows.state_predicate(transitions.CANCEL_PENDING.sources)}
"""
ANY_IN_FLIGHT = """
SELECT EXISTS (
    SELECT 1 FROM requests INDEXED BY requests_in_flight_batch
    WHERE batch_id = ? AND claimed_at IS NOT NULL AND finished_at IS NULL
)
"""
MARK_CANCELLING = "UPDATE batches SET cancelling_at = ?, cancelled_at = ? WHERE id = ?"
RETRY_FAILED = f"""
UPDATE requests SET state = 'pending', attempt = 0, not_before = NULL, daemon_id = NULL, claimed_at = NULL,
    started_at = NULL, finished_at = NULL, response_status = NULL, response_body = NULL, error_code = NULL,
    error_message = NULL, result_bytes = 0
WHERE batch_id = ? AND {rows.state_predicate(transitions.RETRY_FAILED.sources)}
"""
REOPEN_BATCH = "UPDATE batches SET finalizing_at = NULL, completed_at = NULL WHERE id = ?"
DELETE_BATCH = "UPDATE batches SET deleted_at = ?, idempotency_key = NULL WHERE id = ?"
DELETE_VIRTUAL_FILES = "UPDATE files SET deleted_at = COALESCE(deleted_at, ?) WHERE batch_id = ?"
SELECT_EXPIRED = f"""
SELECT id FROM batches
WHERE {_UNFINISHED} AND cancelling_at IS NULL AND deleted_at IS NULL AND expires_at <= ?
ORDER BY expires_at, id LIMIT ?
"""
EXPIRE_REQUESTS = f"""
UPDATE requests SET state = 'failed', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE batch_id = ? AND {rows.state_predicate(transitions.EXPIRE.sources)}
"""
MARK_EXPIRED = "UPDATE batches SET expired_at = ? WHERE id = ?"
SELECT_FINISHED = f"""
SELECT id FROM batches AS b
WHERE {_UNFINISHED} AND deleted_at IS NULL AND in_progress_at IS NOT NULL
    AND NOT EXISTS (
        SELECT 1 FROM requests AS r
        WHERE r.batch_id = b.id AND r.state = 'pending' AND r.state NOT IN ('claimed', 'processing')
    )
    AND NOT EXISTS (
        SELECT 1 FROM requests AS r INDEXED BY requests_in_flight_batch
        WHERE r.batch_id = b.id AND r.claimed_at IS NOT NULL AND r.finished_at IS NULL
    )
ORDER BY expires_at, id LIMIT ?
"""
SELECT_CANCELLING_WITH_PENDING = f"""
SELECT b.id FROM batches AS b
WHERE {_UNFINISHED} AND b.cancelling_at IS NOT NULL AND b.deleted_at IS NULL
    AND EXISTS (SELECT 1 FROM requests AS r WHERE r.batch_id = b.id AND r.state = 'pending')
LIMIT ?
"""
MARK_FINISHED = """
UPDATE batches SET finalizing_at = COALESCE(finalizing_at, ?1),
    completed_at = CASE WHEN cancelling_at IS NULL THEN ?1 END,
    cancelled_at = CASE WHEN cancelling_at IS NOT NULL THEN ?1 END
WHERE id = ?2
"""


def _conflict(connection: sqlite3.Connection, row: rows.BatchRow, action: str) -> errors.StateConflict:
    status = batch_from_row(connection, row).status
    return errors.StateConflict(
        f"Batch {ids.batch_wire(ids.BatchId(connections.to_uuid(row.id)))} is {status}; {action}.",
        current_state=str(status),
    )


def _cancel(connection: sqlite3.Connection, now: int, row: rows.BatchRow) -> None:
    """Cancel an unfinished, not yet cancelling batch: pending requests end at once; the batch is cancelled
    at once if nothing is in flight, else it stays cancelling until `finalize_batches`."""
    connection.execute(
        CANCEL_PENDING,
        (now, lines.BATCH_CANCELLED, lines.CANCELLED_MESSAGE, lines.CANCELLED_LINE_BYTES, row.id),
    )
    in_flight = connection.execute(ANY_IN_FLIGHT, (row.id,)).fetchone()[0]
    connection.execute(MARK_CANCELLING, (now, None if in_flight else now, row.id))


def cancel_batch(
    connection: sqlite3.Connection, now: datetime, batch_id: ids.BatchId, owner: models.OwnerScope
) -> models.Batch:
    row = visible_batch_row(connection, batch_id, owner)
    if row.cancelling_at is None and row.cancelled_at is None:
        if row.is_finished:
            raise _conflict(connection, row, "it can no longer be cancelled")
        _cancel(connection, connections.to_micros(now), row)
    return get_batch(connection, batch_id, owner)


def retry_failed(
    connection: sqlite3.Connection, now: datetime, batch_id: ids.BatchId, owner: models.OwnerScope
) -> int:
    row = visible_batch_row(connection, batch_id, owner)
    if any(moment is not None for moment in (row.failed_at, row.expired_at, row.cancelling_at, row.cancelled_at)):
        raise _conflict(connection, row, "its failed requests cannot be retried")
    if row.budget_exceeded_at is not None:
        raise refusals.budget_spent(ids.BatchId(connections.to_uuid(row.id)))
    moved: int = connection.execute(RETRY_FAILED, (row.id,)).rowcount
    if moved:
        connection.execute(REOPEN_BATCH, (row.id,))
        files.replace_deleted_result_files(connection, now, row)
    return moved


def delete_batch(
    connection: sqlite3.Connection, now: datetime, batch_id: ids.BatchId, owner: models.OwnerScope
) -> None:
    row = visible_batch_row(connection, batch_id, owner)
    moment = connections.to_micros(now)
    if row.cancelling_at is None and not row.is_finished:
        _cancel(connection, moment, row)
    connection.execute(DELETE_BATCH, (moment, row.id))
    connection.execute(DELETE_VIRTUAL_FILES, (moment, row.id))


def expire_batches(
    connection: sqlite3.Connection, now: datetime, *, grace: timedelta, limit: int
) -> list[ids.BatchId]:
    moment = connections.to_micros(now)
    keys = [row[0] for row in connection.execute(SELECT_EXPIRED, (connections.to_micros(now - grace), limit))]
    for key in keys:
        connection.execute(
            EXPIRE_REQUESTS,
            (moment, lines.BATCH_EXPIRED, lines.EXPIRED_MESSAGE, lines.EXPIRED_LINE_BYTES, key),
        )
        connection.execute(MARK_EXPIRED, (moment, key))
    return [ids.BatchId(connections.to_uuid(key)) for key in keys]


def finalize_batches(connection: sqlite3.Connection, now: datetime, *, limit: int) -> list[ids.BatchId]:
    moment = connections.to_micros(now)
    # A daemon may reschedule or release a request after its batch began cancelling (a retry racing the
    # cancel); claims skip such batches, so those requests are cancelled here or the batch would never end.
    leftovers = [row[0] for row in connection.execute(SELECT_CANCELLING_WITH_PENDING, (limit,))]
    connection.executemany(
        CANCEL_PENDING,
        [
            (moment, lines.BATCH_CANCELLED, lines.CANCELLED_MESSAGE, lines.CANCELLED_LINE_BYTES, key)
            for key in leftovers
        ],
    )
    keys = [row[0] for row in connection.execute(SELECT_FINISHED, (limit,))]
    connection.executemany(MARK_FINISHED, [(moment, key) for key in keys])
    return [ids.BatchId(connections.to_uuid(key)) for key in keys]
