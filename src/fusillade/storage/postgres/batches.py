"""Batches: creation (with its virtual files and one request per template), lookups and listings."""

from __future__ import annotations

from datetime import datetime, timedelta

from fusillade import errors
from fusillade.domain import ids, models, states
from fusillade.storage import budgets, refusals
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

_SELECT_INPUT_FILE = """
SELECT purpose, request_count FROM files
WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR owner = $2)
FOR SHARE
"""

_MISMATCHED_URLS = """
SELECT line_number, url FROM request_templates
WHERE file_id = $1 AND url <> $2
ORDER BY line_number
LIMIT $3
"""

# `model`: the one model of the input file's lines, NULL when they name several.
_INSERT_BATCH = """
INSERT INTO batches (
    id, owner, input_file_id, output_file_id, error_file_id, endpoint, completion_window, metadata,
    idempotency_key, total_requests, created_at, expires_at, in_progress_at, budget, model
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $11, $13,
    (SELECT CASE WHEN min(t.model) = max(t.model) THEN min(t.model) END
     FROM request_templates t WHERE t.file_id = $3))
ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL AND deleted_at IS NULL DO NOTHING
RETURNING model
"""

_FILE_MODELS = "SELECT DISTINCT model FROM request_templates WHERE file_id = $1"

_INSERT_RESULT_FILES = """
INSERT INTO files (id, owner, filename, purpose, batch_id, created_at)
VALUES ($1, $3, $4, 'batch_output', $6, $7), ($2, $3, $5, 'batch_error', $6, $7)
"""

_INSERT_REQUESTS = """
INSERT INTO requests (id, batch_id, template_id, line_number, custom_id_bytes, deadline, owner, model, custom_id)
SELECT ordered_uuid(s.head, s.start + t.line_number), $1, t.id, t.line_number, t.custom_id_bytes, $2, $3, t.model,
       t.custom_id
FROM request_templates t
CROSS JOIN ordered_uuid_seed() AS s
WHERE t.file_id = $4
"""

_SELECT_BY_IDEMPOTENCY_KEY = f"""
SELECT {rows.BATCH_COLUMNS}
FROM {rows.BATCH_SOURCE}
WHERE b.owner = $1 AND b.idempotency_key = $2 AND b.deleted_at IS NULL
"""

_SELECT_BATCH = f"""
SELECT {rows.BATCH_COLUMNS}
FROM {rows.BATCH_SOURCE}
WHERE b.id = $1 AND b.deleted_at IS NULL AND ($2::text IS NULL OR b.owner = $2)
"""

_BATCH_VISIBLE = """
SELECT 1 FROM batches WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR owner = $2)
"""

_SELECT_CURSOR = """
SELECT created_at, id FROM batches
WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR owner = $2)
"""

_LIST_BATCHES = f"""
SELECT {rows.BATCH_COLUMNS}
FROM {rows.BATCH_SOURCE}
WHERE b.deleted_at IS NULL
  AND ($1::text IS NULL OR b.owner = $1)
  AND ($2::timestamptz IS NULL OR (b.created_at, b.id) < ($2, $3::uuid))
ORDER BY b.created_at DESC, b.id DESC
LIMIT $4
"""

_SELECT_REQUEST_CURSOR = "SELECT line_number FROM requests WHERE id = $1 AND batch_id = $2"

# `state <> 'in_flight'` lets requests_batch_state serve whatever `$2` is.
_REQUESTS_IN_STATE = f"""
SELECT {rows.REQUEST_COLUMNS}
FROM requests r
WHERE r.batch_id = $1 AND r.state = $2 AND r.state <> 'in_flight' AND r.line_number > $3
ORDER BY r.line_number
LIMIT $4
"""

# Claimed ($2 false) or processing ($2 true): few rows, found through requests_in_flight.
_REQUESTS_IN_FLIGHT = f"""
SELECT {rows.REQUEST_COLUMNS}
FROM requests r
WHERE r.batch_id = $1 AND r.state = 'in_flight' AND (r.started_at IS NOT NULL) = $2 AND r.line_number > $3
ORDER BY r.line_number
LIMIT $4
"""

# One ordered range per stored state, merged in line order: of requests_batch_state, and for in-flight
# requests of requests_in_flight.
_ALL_REQUESTS = " UNION ALL ".join(
    f"""(SELECT {rows.REQUEST_COLUMNS} FROM requests r
        WHERE r.batch_id = $1 AND r.state = '{stored}' AND r.line_number > $2
        ORDER BY r.line_number LIMIT $3)"""
    for stored in ("pending", "in_flight", "completed", "failed", "canceled")
)
_LIST_REQUESTS = f"SELECT * FROM ({_ALL_REQUESTS}) AS r ORDER BY r.line_number LIMIT $3"


def result_file_name(batch_id: ids.BatchId, kind: str) -> str:
    return f"batch_{batch_id.hex}_{kind}.jsonl"


async def find_by_idempotency_key(connection: Connection, owner: str, key: str) -> models.Batch | None:
    row = await connection.fetchrow(_SELECT_BY_IDEMPOTENCY_KEY, owner, key)
    return None if row is None else rows.batch_from_row(row)


async def _check_input_file(connection: Connection, spec: models.BatchSpec) -> int:
    """The number of templates of the spec's input file, after checking that it may be used."""
    row = await connection.fetchrow(_SELECT_INPUT_FILE, spec.input_file_id, spec.owner)
    if row is None:
        raise refusals.no_file(spec.input_file_id)
    if row["purpose"] != states.FilePurpose.BATCH:
        raise refusals.not_an_input_file(spec.input_file_id, row["purpose"])
    mismatched = await connection.fetch(
        _MISMATCHED_URLS, spec.input_file_id, spec.endpoint, refusals.MAX_ENDPOINT_ERRORS
    )
    if mismatched:
        raise refusals.endpoint_mismatch(
            spec.input_file_id, spec.endpoint, [(bad["line_number"], bad["url"]) for bad in mismatched]
        )
    count: int = row["request_count"]
    return count


async def create_batch(
    connection: Connection, spec: models.BatchSpec, *, window: timedelta, now: datetime
) -> models.Batch:
    """Insert the batch, its two virtual files and its requests (call inside a transaction). With an
    idempotency key already used by the owner (also by a concurrent create), the existing batch is returned."""
    if spec.idempotency_key is not None:
        existing = await find_by_idempotency_key(connection, spec.owner, spec.idempotency_key)
        if existing is not None:
            return existing
    total = await _check_input_file(connection, spec)
    batch_id = ids.new_batch_id()
    output_file_id, error_file_id = ids.new_file_id(), ids.new_file_id()
    expires_at = now + window
    metadata = None if spec.metadata is None else dict(spec.metadata)
    budget = None
    if spec.budget is not None:
        file_models = [row["model"] for row in await connection.fetch(_FILE_MODELS, spec.input_file_id)]
        budget = budgets.resolved(spec, file_models)
    inserted = await connection.fetchrow(
        _INSERT_BATCH,
        batch_id,
        spec.owner,
        spec.input_file_id,
        output_file_id,
        error_file_id,
        spec.endpoint,
        spec.completion_window,
        metadata,
        spec.idempotency_key,
        total,
        now,
        expires_at,
        None if budget is None else budgets.document(budget),
    )
    if inserted is None:
        # Only an idempotency key conflicts: a concurrent create with the same key committed first (ON CONFLICT
        # waited for it): return it.
        winner = None
        if spec.idempotency_key is not None:
            winner = await find_by_idempotency_key(connection, spec.owner, spec.idempotency_key)
        if winner is not None:
            return winner
        raise errors.StorageError("A batch with this idempotency key exists but could not be read.")
    model: str | None = inserted["model"]
    await connection.execute(
        _INSERT_RESULT_FILES,
        output_file_id,
        error_file_id,
        spec.owner,
        result_file_name(batch_id, "output"),
        result_file_name(batch_id, "error"),
        batch_id,
        now,
    )
    await connection.execute(_INSERT_REQUESTS, batch_id, expires_at, spec.owner, spec.input_file_id)
    return models.Batch(
        id=batch_id,
        owner=spec.owner,
        input_file_id=spec.input_file_id,
        output_file_id=output_file_id,
        error_file_id=error_file_id,
        endpoint=spec.endpoint,
        completion_window=spec.completion_window,
        metadata=metadata,
        created_at=now,
        expires_at=expires_at,
        in_progress_at=now,
        counts=models.RequestCounts(total=total, pending=total),
        model=model,
        budget=budget,
    )


async def fetch_batch(connection: Connection, batch_id: ids.BatchId, owner: models.OwnerScope) -> models.Batch:
    row = await connection.fetchrow(_SELECT_BATCH, batch_id, rows.owner_parameter(owner))
    if row is None:
        raise refusals.no_batch(batch_id)
    return rows.batch_from_row(row)


async def list_batches(
    connection: Connection, *, owner: models.OwnerScope, after: ids.BatchId | None, limit: int
) -> models.Page[models.Batch]:
    owner_value = rows.owner_parameter(owner)
    cursor = None
    if after is not None:
        cursor = await connection.fetchrow(_SELECT_CURSOR, after, owner_value)
        if cursor is None:
            raise refusals.no_batch(after)
    limit = max(limit, 0)
    found = await connection.fetch(
        _LIST_BATCHES,
        owner_value,
        None if cursor is None else cursor["created_at"],
        None if cursor is None else cursor["id"],
        limit + 1,
    )
    return models.Page(items=[rows.batch_from_row(row) for row in found[:limit]], has_more=len(found) > limit)


async def list_requests(
    connection: Connection,
    batch_id: ids.BatchId,
    *,
    owner: models.OwnerScope,
    state: states.RequestState | None,
    after: ids.RequestId | None,
    limit: int,
) -> models.Page[models.Request]:
    if await connection.fetchval(_BATCH_VISIBLE, batch_id, rows.owner_parameter(owner)) is None:
        raise refusals.no_batch(batch_id)
    after_line = 0
    if after is not None:
        line = await connection.fetchval(_SELECT_REQUEST_CURSOR, after, batch_id)
        if line is None:
            raise refusals.no_request(after, batch_id)
        after_line = line
    limit = max(limit, 0)
    if state is None:
        found = await connection.fetch(_LIST_REQUESTS, batch_id, after_line, limit + 1)
    elif state.is_in_flight:
        processing = state is states.RequestState.PROCESSING
        found = await connection.fetch(_REQUESTS_IN_FLIGHT, batch_id, processing, after_line, limit + 1)
    else:
        found = await connection.fetch(_REQUESTS_IN_STATE, batch_id, state.value, after_line, limit + 1)
    return models.Page(items=[rows.request_from_row(row) for row in found[:limit]], has_more=len(found) > limit)
