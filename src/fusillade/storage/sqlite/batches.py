"""Batches on SQLite: creation with their requests, reads with fresh counts, cancel, retry, delete, expiry and
finalization. Functions take a connection inside an open transaction."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from typing import Any, Final

import orjson

from fusillade import errors
from fusillade.domain import ids, lines, models, states
from fusillade.storage import validation
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite import files, records

_UNFINISHED: Final = "completed_at IS NULL AND failed_at IS NULL AND expired_at IS NULL AND cancelled_at IS NULL"

SELECT_BATCH = f"SELECT {records.BATCH_COLUMNS} FROM batches WHERE id = ? AND deleted_at IS NULL"
SELECT_BY_IDEMPOTENCY_KEY = f"""
SELECT {records.BATCH_COLUMNS} FROM batches WHERE owner = ? AND idempotency_key = ? AND deleted_at IS NULL
"""
# Settled = not in flight (see the schema): the in-flight count is total_requests minus these.
COUNT_SETTLED = """
SELECT state, COUNT(*) FROM requests WHERE batch_id = ? AND state NOT IN ('claimed', 'processing') GROUP BY state
"""
SELECT_MISMATCHED_URLS = f"""
SELECT line_number, url FROM request_templates WHERE file_id = ? AND url != ?
ORDER BY line_number LIMIT {validation.MAX_ENDPOINT_ERRORS}
"""
INSERT_BATCH = """
INSERT INTO batches (id, owner, input_file_id, output_file_id, error_file_id, endpoint, completion_window,
    metadata, idempotency_key, total_requests, created_at, expires_at, in_progress_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
INSERT_REQUESTS = """
INSERT INTO requests (id, batch_id, template_id, owner, custom_id, custom_id_bytes, model, line_number, deadline,
    state, attempt)
SELECT new_uuid(), ?, id, ?, custom_id, custom_id_bytes, model, line_number, ?, 'pending', 0
FROM request_templates WHERE file_id = ? ORDER BY line_number
"""
CANCEL_PENDING = """
UPDATE requests SET state = 'canceled', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE batch_id = ? AND state = 'pending'
"""
ANY_IN_FLIGHT = """
SELECT EXISTS (
    SELECT 1 FROM requests INDEXED BY requests_in_flight_batch
    WHERE batch_id = ? AND claimed_at IS NOT NULL AND finished_at IS NULL
)
"""
MARK_CANCELLING = "UPDATE batches SET cancelling_at = ?, cancelled_at = ? WHERE id = ?"
RETRY_FAILED = """
UPDATE requests SET state = 'pending', attempt = 0, not_before = NULL, daemon_id = NULL, claimed_at = NULL,
    started_at = NULL, finished_at = NULL, response_status = NULL, response_body = NULL, error_code = NULL,
    error_message = NULL, result_bytes = 0
WHERE batch_id = ? AND state = 'failed'
"""
REOPEN_BATCH = "UPDATE batches SET finalizing_at = NULL, completed_at = NULL WHERE id = ?"
DELETE_BATCH = "UPDATE batches SET deleted_at = ?, idempotency_key = NULL WHERE id = ?"
DELETE_VIRTUAL_FILES = "UPDATE files SET deleted_at = COALESCE(deleted_at, ?) WHERE batch_id = ?"
SELECT_REQUEST_LINE = "SELECT line_number FROM requests WHERE id = ? AND batch_id = ?"
SELECT_EXPIRED = f"""
SELECT id FROM batches
WHERE {_UNFINISHED} AND cancelling_at IS NULL AND deleted_at IS NULL AND expires_at <= ?
ORDER BY expires_at, id LIMIT ?
"""
EXPIRE_REQUESTS = """
UPDATE requests SET state = 'failed', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE batch_id = ? AND state IN ('pending', 'claimed', 'processing')
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


# ------------------------------------------------------------------------------------------------ reads


def visible_batch_row(
    connection: sqlite3.Connection, batch_id: ids.BatchId, owner: models.OwnerScope
) -> records.BatchRow:
    """The batch's row, or `NotFound` if it is missing, deleted or another owner's."""
    found = connection.execute(SELECT_BATCH, (batch_id.bytes,)).fetchone()
    if found is None or not records.owner_matches(found[1], owner):
        raise errors.NotFound(f"No batch {ids.batch_wire(batch_id)}.")
    return records.BatchRow._make(found)


def batch_from_row(connection: sqlite3.Connection, row: records.BatchRow) -> models.Batch:
    """The batch of a row, with counts of its requests."""
    counted = connection.execute(COUNT_SETTLED, (row.id,))
    return records.batch_from_row(row, records.counts_from_rows(row.total_requests, counted))


def get_batch(connection: sqlite3.Connection, batch_id: ids.BatchId, owner: models.OwnerScope) -> models.Batch:
    return batch_from_row(connection, visible_batch_row(connection, batch_id, owner))


def list_batches(
    connection: sqlite3.Connection, *, owner: models.OwnerScope, after: ids.BatchId | None, limit: int
) -> models.Page[models.Batch]:
    conditions = ["deleted_at IS NULL"]
    parameters: list[Any] = []
    if owner is not models.ALL_OWNERS:
        conditions.append("owner = ?")
        parameters.append(owner)
    if after is not None:
        cursor = visible_batch_row(connection, after, owner)
        conditions.append("(created_at, id) < (?, ?)")
        parameters.extend((cursor.created_at, cursor.id))
    sql = (
        f"SELECT {records.BATCH_COLUMNS} FROM batches WHERE {' AND '.join(conditions)} "
        "ORDER BY created_at DESC, id DESC LIMIT ?"
    )
    parameters.append(max(limit, 0) + 1)
    rows = [records.BatchRow._make(row) for row in connection.execute(sql, parameters)]
    return models.Page(items=[batch_from_row(connection, row) for row in rows[:limit]], has_more=len(rows) > limit)


def list_requests(
    connection: sqlite3.Connection,
    batch_id: ids.BatchId,
    *,
    owner: models.OwnerScope,
    state: states.RequestState | None,
    after: ids.RequestId | None,
    limit: int,
) -> models.Page[models.Request]:
    visible_batch_row(connection, batch_id, owner)
    conditions = ["batch_id = ?"]
    parameters: list[Any] = [batch_id.bytes]
    if state is not None:
        conditions.append("state = ?")
        parameters.append(state.value)
    if after is not None:
        cursor = connection.execute(SELECT_REQUEST_LINE, (after.bytes, batch_id.bytes)).fetchone()
        if cursor is None:
            raise errors.NotFound(f"No request {ids.request_wire(after)} in batch {ids.batch_wire(batch_id)}.")
        conditions.append("line_number > ?")
        parameters.append(cursor[0])
    sql = (
        f"SELECT {records.REQUEST_COLUMNS} FROM requests WHERE {' AND '.join(conditions)} "
        "ORDER BY line_number LIMIT ?"
    )
    parameters.append(max(limit, 0) + 1)
    rows = [records.RequestRow._make(row) for row in connection.execute(sql, parameters)]
    return models.Page(items=[records.request_from_row(row) for row in rows[:limit]], has_more=len(rows) > limit)


# ----------------------------------------------------------------------------------------------- writes


def create_batch(connection: sqlite3.Connection, now: datetime, spec: models.BatchSpec) -> models.Batch:
    if spec.idempotency_key is not None:
        existing = find_by_idempotency_key(connection, spec)
        if existing is not None:
            return existing
    input_file = files.visible_file_row(connection, spec.input_file_id, spec.owner)
    if not input_file.is_input:
        raise validation.not_an_input_file(spec.input_file_id, input_file.purpose)
    window = models.parse_completion_window(spec.completion_window)
    _check_endpoint(connection, spec)
    batch_id = ids.new_batch_id()
    created_at = connections.to_micros(now)
    expires_at = connections.to_micros(now + window)
    output_id, error_id = files.insert_virtual_files(
        connection, batch_id=batch_id, owner=spec.owner, created_at=created_at
    )
    connection.execute(
        INSERT_BATCH,
        (
            batch_id.bytes,
            spec.owner,
            spec.input_file_id.bytes,
            output_id.bytes,
            error_id.bytes,
            spec.endpoint,
            spec.completion_window,
            None if spec.metadata is None else orjson.dumps(dict(spec.metadata)).decode(),
            spec.idempotency_key,
            input_file.request_count,
            created_at,
            expires_at,
            created_at,
        ),
    )
    connection.execute(INSERT_REQUESTS, (batch_id.bytes, spec.owner, expires_at, spec.input_file_id.bytes))
    return get_batch(connection, batch_id, spec.owner)


def _check_endpoint(connection: sqlite3.Connection, spec: models.BatchSpec) -> None:
    rows = connection.execute(SELECT_MISMATCHED_URLS, (spec.input_file_id.bytes, spec.endpoint)).fetchall()
    if rows:
        raise validation.endpoint_mismatch(spec.input_file_id, spec.endpoint, rows)


def find_by_idempotency_key(connection: sqlite3.Connection, spec: models.BatchSpec) -> models.Batch | None:
    found = connection.execute(SELECT_BY_IDEMPOTENCY_KEY, (spec.owner, spec.idempotency_key)).fetchone()
    return None if found is None else batch_from_row(connection, records.BatchRow._make(found))


def _conflict(connection: sqlite3.Connection, row: records.BatchRow, action: str) -> errors.StateConflict:
    status = batch_from_row(connection, row).status
    return errors.StateConflict(
        f"Batch {ids.batch_wire(ids.BatchId(connections.to_uuid(row.id)))} is {status}; {action}.",
        current_state=str(status),
    )


def _cancel(connection: sqlite3.Connection, now: int, row: records.BatchRow) -> None:
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
