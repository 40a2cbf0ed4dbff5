"""Batches on SQLite: creation with their requests, and reads with fresh counts (cancel, retry, delete, expiry and
finalization: `lifecycle`). Functions take a connection inside an open transaction."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Any

import orjson

from fusillade.domain import ids, models, states
from fusillade.storage import budgets, refusals
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite import files, rows

SELECT_BATCH = f"SELECT {rows.BATCH_COLUMNS} FROM batches WHERE id = ? AND deleted_at IS NULL"
SELECT_BY_IDEMPOTENCY_KEY = f"""
SELECT {rows.BATCH_COLUMNS} FROM batches WHERE owner = ? AND idempotency_key = ? AND deleted_at IS NULL
"""
# Settled = not in flight (see the schema): the in-flight count is total_requests minus these.
COUNT_SETTLED = """
SELECT state, COUNT(*) FROM requests WHERE batch_id = ? AND state NOT IN ('claimed', 'processing') GROUP BY state
"""
SELECT_MISMATCHED_URLS = f"""
SELECT line_number, url FROM request_templates WHERE file_id = ? AND url != ?
ORDER BY line_number LIMIT {refusals.MAX_ENDPOINT_ERRORS}
"""
# `model`: the one model of the input file's lines, NULL when they name several.
INSERT_BATCH = """
INSERT INTO batches (id, owner, input_file_id, output_file_id, error_file_id, endpoint, completion_window,
    metadata, idempotency_key, total_requests, created_at, expires_at, in_progress_at, budget, model)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
    (SELECT CASE WHEN min(model) = max(model) THEN min(model) END FROM request_templates WHERE file_id = ?3))
"""
SELECT_FILE_MODELS = "SELECT DISTINCT model FROM request_templates WHERE file_id = ?"
SELECT_USAGE = """
SELECT model, sum(requests), sum(unknown), sum(input_tokens), sum(cached_tokens), sum(output_tokens),
    sum(reasoning_tokens)
FROM batch_usage WHERE batch_id = ? GROUP BY model ORDER BY model
"""
INSERT_REQUESTS = """
INSERT INTO requests (id, batch_id, template_id, owner, custom_id, custom_id_bytes, model, line_number, deadline,
    state, attempt)
SELECT new_uuid(), ?, id, ?, custom_id, custom_id_bytes, model, line_number, ?, 'pending', 0
FROM request_templates WHERE file_id = ? ORDER BY line_number
"""
SELECT_REQUEST_LINE = "SELECT line_number FROM requests WHERE id = ? AND batch_id = ?"


# ------------------------------------------------------------------------------------------------ reads


def visible_batch_row(
    connection: sqlite3.Connection, batch_id: ids.BatchId, owner: models.OwnerScope
) -> rows.BatchRow:
    """The batch's row, or `NotFound` if it is missing, deleted or another owner's."""
    found = connection.execute(SELECT_BATCH, (batch_id.bytes,)).fetchone()
    if found is None or not rows.owner_matches(found[1], owner):
        raise refusals.no_batch(batch_id)
    return rows.BatchRow._make(found)


def batch_from_row(connection: sqlite3.Connection, row: rows.BatchRow) -> models.Batch:
    """The batch of a row, with counts of its requests and its usage by model."""
    counted = connection.execute(COUNT_SETTLED, (row.id,))
    usage = tuple(rows.model_usage(found) for found in connection.execute(SELECT_USAGE, (row.id,)))
    return rows.batch_from_row(row, rows.counts_from_rows(row.total_requests, counted), usage)


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
        f"SELECT {rows.BATCH_COLUMNS} FROM batches WHERE {' AND '.join(conditions)} "
        "ORDER BY created_at DESC, id DESC LIMIT ?"
    )
    parameters.append(max(limit, 0) + 1)
    found = [rows.BatchRow._make(row) for row in connection.execute(sql, parameters)]
    items = [batch_from_row(connection, row) for row in found[:limit]]
    return models.Page(items=items, has_more=len(found) > limit)


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
            raise refusals.no_request(after, batch_id)
        conditions.append("line_number > ?")
        parameters.append(cursor[0])
    sql = (
        f"SELECT {rows.REQUEST_COLUMNS} FROM requests WHERE {' AND '.join(conditions)} "
        "ORDER BY line_number LIMIT ?"
    )
    parameters.append(max(limit, 0) + 1)
    found = [rows.RequestRow._make(row) for row in connection.execute(sql, parameters)]
    return models.Page(items=[rows.request_from_row(row) for row in found[:limit]], has_more=len(found) > limit)


# ----------------------------------------------------------------------------------------------- writes


def create_batch(connection: sqlite3.Connection, now: datetime, spec: models.BatchSpec) -> models.Batch:
    if spec.idempotency_key is not None:
        existing = find_by_idempotency_key(connection, spec)
        if existing is not None:
            return existing
    input_file = files.visible_file_row(connection, spec.input_file_id, spec.owner)
    if not input_file.is_input:
        raise refusals.not_an_input_file(spec.input_file_id, input_file.purpose)
    window = models.parse_completion_window(spec.completion_window)
    _check_endpoint(connection, spec)
    batch_id = ids.new_batch_id()
    created_at = connections.to_micros(now)
    expires_at = connections.to_micros(now + window)
    output_id, error_id = files.insert_virtual_files(
        connection, batch_id=batch_id, owner=spec.owner, created_at=created_at
    )
    budget = (
        None
        if spec.budget is None
        else budgets.resolved(
            spec, (model for (model,) in connection.execute(SELECT_FILE_MODELS, (spec.input_file_id.bytes,)))
        )
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
            None if budget is None else orjson.dumps(budgets.document(budget)).decode(),
        ),
    )
    connection.execute(INSERT_REQUESTS, (batch_id.bytes, spec.owner, expires_at, spec.input_file_id.bytes))
    return get_batch(connection, batch_id, spec.owner)


def _check_endpoint(connection: sqlite3.Connection, spec: models.BatchSpec) -> None:
    mismatched = connection.execute(SELECT_MISMATCHED_URLS, (spec.input_file_id.bytes, spec.endpoint)).fetchall()
    if mismatched:
        raise refusals.endpoint_mismatch(spec.input_file_id, spec.endpoint, mismatched)


def find_by_idempotency_key(connection: sqlite3.Connection, spec: models.BatchSpec) -> models.Batch | None:
    found = connection.execute(SELECT_BY_IDEMPOTENCY_KEY, (spec.owner, spec.idempotency_key)).fetchone()
    return None if found is None else batch_from_row(connection, rows.BatchRow._make(found))
