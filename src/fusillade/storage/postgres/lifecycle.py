"""Batch lifecycle: cancel, retry of failed requests, soft delete, expiry and finalization.

Every operation that changes a batch first locks its row (`FOR UPDATE`), so cancel, retry, delete, expire and
finalize of one batch take turns; statements that look at the batch's requests run after the lock, so they
see every change committed before it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from fusillade import errors
from fusillade.domain import ids, lines, models, states, transitions
from fusillade.storage import refusals
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

_UNFINISHED = """
    completed_at IS NULL AND failed_at IS NULL AND expired_at IS NULL AND cancelled_at IS NULL
"""

_LOCK_BATCH = """
SELECT id, output_file_id, error_file_id, completed_at, failed_at, expired_at, cancelling_at, cancelled_at,
    budget_exceeded_at
FROM batches
WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR owner = $2)
FOR UPDATE
"""

_CANCEL_PENDING = f"""
UPDATE requests
SET state = 'canceled', finished_at = $2, error_code = $3, error_message = $4,
    result_bytes = custom_id_bytes + $5
WHERE batch_id = ANY($1::uuid[]) AND {rows.state_predicate(transitions.CANCEL_PENDING.sources, alias="")}
"""

_MARK_CANCELLING = """
UPDATE batches
SET cancelling_at = $2::timestamptz,
    cancelled_at = CASE
        WHEN EXISTS (
            SELECT 1 FROM requests r WHERE r.batch_id = $1 AND r.state = 'in_flight'
        ) THEN NULL
        ELSE $2
    END
WHERE id = $1
"""

_RETRY_FAILED = f"""
UPDATE requests r
SET state = 'pending', attempt = 0, not_before = NULL, daemon_id = NULL, claimed_at = NULL, started_at = NULL,
    finished_at = NULL, response_status = NULL, response_body = NULL, error_code = NULL, error_message = NULL,
    result_bytes = 0
WHERE r.batch_id = $1 AND {rows.state_predicate(transitions.RETRY_FAILED.sources)}
"""

_REOPEN = "UPDATE batches SET finalizing_at = NULL, completed_at = NULL WHERE id = $1"

_DELETED_RESULT_FILES = "SELECT purpose FROM files WHERE id = ANY($1::uuid[]) AND deleted_at IS NOT NULL"

_NEW_RESULT_FILE = """
INSERT INTO files (id, owner, filename, purpose, batch_id, created_at)
SELECT $1, owner, $3, $2, id, $4 FROM batches WHERE id = $5
"""

_POINT_TO_OUTPUT = "UPDATE batches SET output_file_id = $2 WHERE id = $1"
_POINT_TO_ERRORS = "UPDATE batches SET error_file_id = $2 WHERE id = $1"

_DELETE_RESULT_FILES = "UPDATE files SET deleted_at = COALESCE(deleted_at, $2) WHERE id = ANY($1::uuid[])"

_DELETE_BATCH = "UPDATE batches SET deleted_at = $2 WHERE id = $1"

_DUE_FOR_EXPIRY = f"""
SELECT id FROM batches
WHERE {_UNFINISHED} AND cancelling_at IS NULL AND deleted_at IS NULL AND expires_at <= $1
ORDER BY expires_at, id
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

_EXPIRE_REQUESTS = f"""
UPDATE requests
SET state = 'failed', finished_at = $2, error_code = $3, error_message = $4, response_status = NULL,
    response_body = NULL, result_bytes = custom_id_bytes + $5
WHERE batch_id = ANY($1::uuid[]) AND {rows.state_predicate(transitions.EXPIRE.sources, alias="")}
"""

_MARK_EXPIRED = "UPDATE batches SET expired_at = $2 WHERE id = ANY($1::uuid[])"

_CANCELLING_WITH_PENDING = f"""
SELECT b.id FROM batches b
WHERE {_UNFINISHED} AND b.cancelling_at IS NOT NULL AND b.deleted_at IS NULL
  AND EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id AND r.state = 'pending')
"""

# Two lookups: pending requests are in requests_batch_state, in-flight ones in requests_in_flight.
_NOTHING_ACTIVE = """
NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id AND r.state = 'pending')
AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id AND r.state = 'in_flight')
"""

_DUE_FOR_FINALIZE = f"""
SELECT b.id FROM batches b
WHERE {_UNFINISHED} AND b.deleted_at IS NULL AND b.in_progress_at IS NOT NULL AND {_NOTHING_ACTIVE}
ORDER BY b.expires_at, b.id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

_FINALIZE = f"""
UPDATE batches b
SET finalizing_at = COALESCE(b.finalizing_at, $2::timestamptz),
    completed_at = CASE WHEN b.cancelling_at IS NULL THEN $2::timestamptz END,
    cancelled_at = CASE WHEN b.cancelling_at IS NOT NULL THEN $2::timestamptz END
WHERE b.id = ANY($1::uuid[]) AND {_NOTHING_ACTIVE}
RETURNING b.id
"""


def _row_count(status: str) -> int:
    """The count of an `UPDATE n` / `DELETE n` command status."""
    return int(status.rsplit(" ", 1)[-1])


async def _lock_batch(connection: Connection, batch_id: ids.BatchId, owner: models.OwnerScope) -> asyncpg.Record:
    row = await connection.fetchrow(_LOCK_BATCH, batch_id, rows.owner_parameter(owner))
    if row is None:
        raise refusals.no_batch(batch_id)
    return row


def _is_finished(batch: asyncpg.Record) -> bool:
    return any(batch[name] is not None for name in ("completed_at", "failed_at", "expired_at", "cancelled_at"))


async def _cancel_locked(connection: Connection, batch_id: ids.BatchId, now: datetime) -> None:
    """Cancel the pending requests of a locked, unfinished batch and mark it cancelling (or cancelled when
    nothing is in flight)."""
    await connection.execute(
        _CANCEL_PENDING,
        [batch_id],
        now,
        lines.BATCH_CANCELLED,
        lines.CANCELLED_MESSAGE,
        lines.CANCELLED_LINE_BYTES,
    )
    await connection.execute(_MARK_CANCELLING, batch_id, now)


async def cancel_batch(
    connection: Connection, batch_id: ids.BatchId, owner: models.OwnerScope, now: datetime
) -> None:
    """Cancel the batch (inside a transaction); the caller reads the result."""
    batch = await _lock_batch(connection, batch_id, owner)
    if batch["cancelling_at"] is not None or batch["cancelled_at"] is not None:
        return
    if _is_finished(batch):
        raise errors.StateConflict(
            f"Batch {ids.batch_wire(batch_id)} has already finished; it cannot be cancelled.",
            current_state=_finished_status(batch),
        )
    await _cancel_locked(connection, batch_id, now)


def _finished_status(batch: asyncpg.Record) -> str:
    for name, status in (
        ("failed_at", "failed"),
        ("cancelled_at", "cancelled"),
        ("expired_at", "expired"),
        ("completed_at", "completed"),
        ("cancelling_at", "cancelling"),
    ):
        if batch[name] is not None:
            return status
    return "in_progress"


async def retry_failed(
    connection: Connection, batch_id: ids.BatchId, owner: models.OwnerScope, now: datetime
) -> int:
    """Failed requests back to pending (inside a transaction); the number moved."""
    batch = await _lock_batch(connection, batch_id, owner)
    if any(batch[name] is not None for name in ("cancelling_at", "cancelled_at", "expired_at", "failed_at")):
        raise errors.StateConflict(
            f"Batch {ids.batch_wire(batch_id)} is {_finished_status(batch)}; its failed requests cannot be "
            "retried.",
            current_state=_finished_status(batch),
        )
    if batch["budget_exceeded_at"] is not None:
        raise refusals.budget_spent(batch_id)
    moved = _row_count(await connection.execute(_RETRY_FAILED, batch_id))
    if moved:
        await connection.execute(_REOPEN, batch_id)
        await _replace_deleted_result_files(connection, batch_id, batch, now)
    return moved


async def _replace_deleted_result_files(
    connection: Connection, batch_id: ids.BatchId, batch: asyncpg.Record, now: datetime
) -> None:
    """Give the (locked) batch a new, empty output or error file in place of one its owner deleted, so that the
    results of the requests it runs again are reachable; the deleted file stays deleted."""
    deleted = await connection.fetch(_DELETED_RESULT_FILES, [batch["output_file_id"], batch["error_file_id"]])
    for row in deleted:
        output = row["purpose"] == states.FilePurpose.BATCH_OUTPUT.value
        new_id = ids.new_file_id()
        filename = f"batch_{batch_id.hex}_{'output' if output else 'error'}.jsonl"
        await connection.execute(_NEW_RESULT_FILE, new_id, row["purpose"], filename, now, batch_id)
        await connection.execute(_POINT_TO_OUTPUT if output else _POINT_TO_ERRORS, batch_id, new_id)


async def delete_batch(
    connection: Connection, batch_id: ids.BatchId, owner: models.OwnerScope, now: datetime
) -> None:
    """Soft-delete the batch and its result files, cancelling it first if it is still running."""
    batch = await _lock_batch(connection, batch_id, owner)
    if not _is_finished(batch) and batch["cancelling_at"] is None:
        await _cancel_locked(connection, batch_id, now)
    await connection.execute(_DELETE_RESULT_FILES, [batch["output_file_id"], batch["error_file_id"]], now)
    await connection.execute(_DELETE_BATCH, batch_id, now)


async def expire_batches(
    connection: Connection, *, grace: timedelta, limit: int, now: datetime
) -> list[ids.BatchId]:
    due = [row["id"] for row in await connection.fetch(_DUE_FOR_EXPIRY, now - grace, limit)]
    if not due:
        return []
    await connection.execute(
        _EXPIRE_REQUESTS, due, now, lines.BATCH_EXPIRED, lines.EXPIRED_MESSAGE, lines.EXPIRED_LINE_BYTES
    )
    await connection.execute(_MARK_EXPIRED, due, now)
    return [ids.BatchId(rows.plain_uuid(batch_id)) for batch_id in due]


async def finalize_batches(connection: Connection, *, limit: int, now: datetime) -> list[ids.BatchId]:
    """Finish batches whose requests are all terminal (inside a transaction). Pending requests left in a
    cancelling batch (a daemon released or rescheduled them while the batch was being cancelled) are
    cancelled first, so that such a batch still ends."""
    leftovers = [row["id"] for row in await connection.fetch(_CANCELLING_WITH_PENDING)]
    if leftovers:
        await connection.execute(
            _CANCEL_PENDING,
            leftovers,
            now,
            lines.BATCH_CANCELLED,
            lines.CANCELLED_MESSAGE,
            lines.CANCELLED_LINE_BYTES,
        )
    due = [row["id"] for row in await connection.fetch(_DUE_FOR_FINALIZE, limit)]
    if not due:
        return []
    finished = {row["id"] for row in await connection.fetch(_FINALIZE, due, now)}
    return [ids.BatchId(rows.plain_uuid(batch_id)) for batch_id in due if batch_id in finished]
