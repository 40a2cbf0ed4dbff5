"""Retention: hard deletion of soft-deleted batches and files, a bounded number of rows per call.

Order: requests of deleted batches (not those still in flight: their daemon aborts them first), then the
result files and rows of deleted batches with no request left, then the templates of deleted input files that
no batch still uses (any batch that is not deleted may run them again: a finished one through a retry), then
the input file rows with no template left. Rows are locked with
SKIP LOCKED where two purgers could meet, so replicas purging at once delete disjoint rows.
"""

from __future__ import annotations

from fusillade.storage.postgres.connection import Connection

# Two lookups: requests_batch_state leaves out in-flight requests, requests_in_flight has them.
_NO_REQUESTS = """
NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id AND r.state <> 'in_flight')
AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id AND r.state = 'in_flight')
"""

_PURGE_STEPS = (
    # requests of deleted batches
    """
    DELETE FROM requests WHERE id IN (
        SELECT r.id FROM batches b JOIN requests r ON r.batch_id = b.id
        WHERE b.deleted_at IS NOT NULL AND r.state <> 'in_flight'
        LIMIT $1
        FOR UPDATE OF r SKIP LOCKED
    )
    """,
    # result files of deleted batches that have no request left
    f"""
    DELETE FROM files WHERE id IN (
        SELECT f.id FROM batches b JOIN files f ON f.batch_id = b.id
        WHERE b.deleted_at IS NOT NULL AND {_NO_REQUESTS}
        LIMIT $1
        FOR UPDATE OF f SKIP LOCKED
    )
    """,
    # deleted batches with neither requests nor result files left
    f"""
    DELETE FROM batches WHERE id IN (
        SELECT b.id FROM batches b
        WHERE b.deleted_at IS NOT NULL
          AND {_NO_REQUESTS}
          AND NOT EXISTS (SELECT 1 FROM files f WHERE f.batch_id = b.id)
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    """,
    # templates of deleted input files that no live batch uses (a finished batch may still retry)
    """
    DELETE FROM request_templates WHERE id IN (
        SELECT t.id FROM files f JOIN request_templates t ON t.file_id = f.id
        WHERE f.deleted_at IS NOT NULL AND f.purpose = 'batch'
          AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = f.id AND b.deleted_at IS NULL)
        LIMIT $1
        FOR UPDATE OF t SKIP LOCKED
    )
    """,
    # deleted input files with no template left
    """
    DELETE FROM files WHERE id IN (
        SELECT f.id FROM files f
        WHERE f.deleted_at IS NOT NULL AND f.purpose = 'batch'
          AND NOT EXISTS (SELECT 1 FROM request_templates t WHERE t.file_id = f.id)
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    """,
)


async def purge_deleted(connection: Connection, *, limit: int) -> int:
    """Delete at most `limit` rows in total; 0 means nothing is left to purge."""
    deleted = 0
    for statement in _PURGE_STEPS:
        if deleted >= limit:
            break
        status = await connection.execute(statement, limit - deleted)
        deleted += int(status.rsplit(" ", 1)[-1])
    return deleted
