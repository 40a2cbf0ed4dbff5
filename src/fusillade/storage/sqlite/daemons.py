"""The daemon registry on SQLite: registration, heartbeats, death, and the reclaim of a dead daemon's work."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import datetime, timedelta

import orjson

from fusillade import errors
from fusillade.domain import ids, lines, models, states, transitions
from fusillade.storage import refusals
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite import rows

INSERT_DAEMON = """
INSERT INTO daemons (id, hostname, pid, version, config, status, started_at, last_heartbeat, stopped_at, in_flight)
VALUES (?, ?, ?, ?, ?, 'running', ?, ?, NULL, 0)
"""
SELECT_DAEMON = f"SELECT {rows.DAEMON_COLUMNS} FROM daemons WHERE id = ?"
HEARTBEAT = "UPDATE daemons SET last_heartbeat = ?, in_flight = ?, limits = coalesce(?, limits) WHERE id = ?"
MARK_DEAD = "UPDATE daemons SET status = 'dead', stopped_at = COALESCE(stopped_at, ?) WHERE id = ?"
LIST_DAEMONS = f"SELECT {rows.DAEMON_COLUMNS} FROM daemons ORDER BY started_at DESC, id DESC"
MARK_STALE_DEAD = """
UPDATE daemons SET status = 'dead', stopped_at = COALESCE(stopped_at, ?1)
WHERE status = 'running' AND last_heartbeat < ?2
"""
# Cancel on return (`transitions.CANCEL_ON_RETURN_MARKS`), or a batch row gone.
_RECLAIMABLE = rows.state_predicate(transitions.RECLAIM.sources)
_RECLAIMABLE_ROW = rows.state_predicate(transitions.RECLAIM.sources, alias="r")
SELECT_ORPHANS = f"""
SELECT r.id, (b.id IS NULL OR {rows.CANCEL_ON_RETURN}) AS cancel, b.budget_exceeded_at IS NOT NULL AS spent
FROM requests AS r
LEFT JOIN daemons AS d ON d.id = r.daemon_id
LEFT JOIN batches AS b ON b.id = r.batch_id
WHERE r.claimed_at IS NOT NULL AND r.finished_at IS NULL AND {_RECLAIMABLE_ROW}
    AND (d.id IS NULL OR d.status = 'dead')
LIMIT ?
"""
RETURN_TO_PENDING = f"""
UPDATE requests SET state = 'pending', daemon_id = NULL, claimed_at = NULL, started_at = NULL
WHERE id = ? AND {_RECLAIMABLE}
"""
CANCEL_ORPHAN = f"""
UPDATE requests SET state = 'canceled', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE id = ? AND {_RECLAIMABLE}
"""
# Fail on return (`transitions.FAIL_ON_RETURN`): the batch spent its budget.
FAIL_ORPHAN = f"""
UPDATE requests SET state = 'failed', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE id = ? AND {_RECLAIMABLE}
"""


def register_daemon(connection: sqlite3.Connection, now: datetime, info: models.DaemonInfo) -> models.DaemonRecord:
    daemon_id = ids.new_daemon_id()
    moment = connections.to_micros(now)
    config = orjson.dumps(dict(info.config), default=str).decode()
    connection.execute(
        INSERT_DAEMON, (daemon_id.bytes, info.hostname, info.pid, info.version, config, moment, moment)
    )
    return models.DaemonRecord(
        id=daemon_id,
        hostname=info.hostname,
        pid=info.pid,
        version=info.version,
        status=states.DaemonStatus.RUNNING,
        started_at=now,
        last_heartbeat=now,
    )


def _daemon_row(connection: sqlite3.Connection, daemon_id: ids.DaemonId) -> rows.DaemonRow:
    found = connection.execute(SELECT_DAEMON, (daemon_id.bytes,)).fetchone()
    if found is None:
        raise refusals.no_daemon(daemon_id)
    return rows.DaemonRow._make(found)


def heartbeat(
    connection: sqlite3.Connection,
    now: datetime,
    daemon_id: ids.DaemonId,
    in_flight: int,
    limits: Mapping[str, int] | None,
) -> models.DaemonRecord:
    row = _daemon_row(connection, daemon_id)
    if row.status == states.DaemonStatus.DEAD.value:
        raise errors.StateConflict(
            f"Daemon {daemon_id} was marked dead (its requests may have been reclaimed); it must stop.",
            current_state=row.status,
        )
    encoded = None if limits is None else orjson.dumps(dict(limits)).decode()
    connection.execute(HEARTBEAT, (connections.to_micros(now), in_flight, encoded, daemon_id.bytes))
    return rows.daemon_from_row(_daemon_row(connection, daemon_id))


def mark_daemon_dead(connection: sqlite3.Connection, now: datetime, daemon_id: ids.DaemonId) -> None:
    _daemon_row(connection, daemon_id)
    connection.execute(MARK_DEAD, (connections.to_micros(now), daemon_id.bytes))


def list_daemons(connection: sqlite3.Connection) -> list[models.DaemonRecord]:
    return [rows.daemon_from_row(rows.DaemonRow._make(row)) for row in connection.execute(LIST_DAEMONS)]


def reclaim_requests(connection: sqlite3.Connection, now: datetime, *, stale_after: timedelta, limit: int) -> int:
    moment = connections.to_micros(now)
    connection.execute(MARK_STALE_DEAD, (moment, connections.to_micros(now - stale_after)))
    orphans = connection.execute(SELECT_ORPHANS, (limit,)).fetchall()
    to_pending = [(key,) for key, cancel, spent in orphans if not cancel and not spent]
    to_cancel = [
        (moment, lines.BATCH_CANCELLED, lines.CANCELLED_MESSAGE, lines.CANCELLED_LINE_BYTES, key)
        for key, cancel, _ in orphans
        if cancel
    ]
    to_fail = [
        (moment, lines.BUDGET_EXCEEDED, lines.BUDGET_MESSAGE, lines.BUDGET_LINE_BYTES, key)
        for key, cancel, spent in orphans
        if spent and not cancel
    ]
    connection.executemany(RETURN_TO_PENDING, to_pending)
    connection.executemany(CANCEL_ORPHAN, to_cancel)
    connection.executemany(FAIL_ORPHAN, to_fail)
    return len(orphans)
