"""Daemon registry: registration, heartbeats, death, and the reclaim of a dead daemon's requests."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from fusillade import errors
from fusillade.domain import ids, lines, models, transitions
from fusillade.storage import refusals
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

_REGISTER = f"""
INSERT INTO daemons AS d (id, hostname, pid, version, config, status, started_at, last_heartbeat, in_flight)
VALUES ($1, $2, $3, $4, $5, 'running', $6, $6, 0)
RETURNING {rows.DAEMON_COLUMNS}
"""

_HEARTBEAT = f"""
UPDATE daemons AS d SET last_heartbeat = $2, in_flight = $3, limits = coalesce($4::jsonb, d.limits)
WHERE d.id = $1 AND d.status = 'running'
RETURNING {rows.DAEMON_COLUMNS}
"""

_STATUS = "SELECT status FROM daemons WHERE id = $1"

_MARK_DEAD = """
UPDATE daemons SET status = 'dead', stopped_at = COALESCE(stopped_at, $2)
WHERE id = $1
RETURNING id
"""

_LIST = f"SELECT {rows.DAEMON_COLUMNS} FROM daemons d ORDER BY d.started_at DESC, d.id DESC"

_MARK_STALE_DEAD = """
UPDATE daemons SET status = 'dead', stopped_at = COALESCE(stopped_at, $1)
WHERE status = 'running' AND last_heartbeat < $2
"""

# A request goes back to pending, or ends canceled when its batch is being cancelled or was deleted, or failed
# (`budget_exceeded`) when its batch spent its budget (`transitions.FAIL_ON_RETURN`). Rows are
# locked first (SKIP LOCKED) so that two sweeps never move the same row.
_RECLAIM = f"""
WITH stale AS (
    SELECT r.id, ({rows.CANCEL_ON_RETURN}) AS cancel, b.budget_exceeded_at IS NOT NULL AS spent
    FROM requests r
    JOIN batches b ON b.id = r.batch_id
    WHERE {rows.state_predicate(transitions.RECLAIM.sources)}
      AND NOT EXISTS (SELECT 1 FROM daemons d WHERE d.id = r.daemon_id AND d.status = 'running')
    LIMIT $1
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE requests r
SET state = CASE WHEN s.cancel THEN 'canceled' WHEN s.spent THEN 'failed' ELSE 'pending' END,
    daemon_id = CASE WHEN s.cancel OR s.spent THEN r.daemon_id END,
    claimed_at = CASE WHEN s.cancel OR s.spent THEN r.claimed_at END,
    started_at = CASE WHEN s.cancel OR s.spent THEN r.started_at END,
    finished_at = CASE WHEN s.cancel OR s.spent THEN $2::timestamptz END,
    error_code = CASE WHEN s.cancel THEN $3 WHEN s.spent THEN $6 ELSE r.error_code END,
    error_message = CASE WHEN s.cancel THEN $4 WHEN s.spent THEN $7 ELSE r.error_message END,
    result_bytes = CASE
        WHEN s.cancel THEN r.custom_id_bytes + $5 WHEN s.spent THEN r.custom_id_bytes + $8 ELSE r.result_bytes
    END
FROM stale s
WHERE r.id = s.id
"""


async def register_daemon(connection: Connection, info: models.DaemonInfo, now: datetime) -> models.DaemonRecord:
    row = await connection.fetchrow(
        _REGISTER, ids.new_daemon_id(), info.hostname, info.pid, info.version, dict(info.config), now
    )
    assert row is not None  # INSERT … RETURNING always returns the row
    return rows.daemon_from_row(row)


async def heartbeat(
    connection: Connection,
    daemon_id: ids.DaemonId,
    in_flight: int,
    limits: Mapping[str, int] | None,
    now: datetime,
) -> models.DaemonRecord:
    encoded = None if limits is None else dict(limits)
    row = await connection.fetchrow(_HEARTBEAT, daemon_id, now, in_flight, encoded)
    if row is not None:
        return rows.daemon_from_row(row)
    status = await connection.fetchval(_STATUS, daemon_id)
    if status is None:
        raise refusals.no_daemon(daemon_id)
    raise errors.StateConflict(
        f"Daemon {daemon_id} was marked dead (its requests may have been reclaimed); it must stop.",
        current_state=status,
    )


async def mark_daemon_dead(connection: Connection, daemon_id: ids.DaemonId, now: datetime) -> None:
    if await connection.fetchval(_MARK_DEAD, daemon_id, now) is None:
        raise refusals.no_daemon(daemon_id)


async def list_daemons(connection: Connection) -> list[models.DaemonRecord]:
    return [rows.daemon_from_row(row) for row in await connection.fetch(_LIST)]


async def reclaim_requests(connection: Connection, *, stale_after: timedelta, limit: int, now: datetime) -> int:
    """Mark stale daemons dead, then move up to `limit` requests of dead or unknown daemons (inside a
    transaction). Returns how many requests moved."""
    await connection.execute(_MARK_STALE_DEAD, now, now - stale_after)
    if limit <= 0:
        return 0
    status = await connection.execute(
        _RECLAIM,
        limit,
        now,
        lines.BATCH_CANCELLED,
        lines.CANCELLED_MESSAGE,
        lines.CANCELLED_LINE_BYTES,
        lines.BUDGET_EXCEEDED,
        lines.BUDGET_MESSAGE,
        lines.BUDGET_LINE_BYTES,
    )
    return int(status.rsplit(" ", 1)[-1])
