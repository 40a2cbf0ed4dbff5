"""Fenced request writes of one daemon on SQLite, group-committed: one `executemany` per kind of write, each
UPDATE fenced on the daemon and on the states the transition table (`domain.transitions`) lets its command apply
from. Runs inside the transaction of a tick (`RequestQueue.apply_writes[_and_claim]`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import orjson

from fusillade.domain import ids, lines, models, states, transitions
from fusillade.storage import budgets
from fusillade.storage.sqlite import batches, rows
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.usage_sums import usage_sums

# The ids of a write group travel as one BLOB of concatenated 16-byte UUIDs, split here in SQL: one cached
# statement whatever the group size.
SELECT_CURRENT = """
WITH RECURSIVE wanted(position, id) AS (
    SELECT 1, substr(?1, 1, 16) WHERE length(?1) >= 16
    UNION ALL
    SELECT position + 16, substr(?1, position + 16, 16) FROM wanted WHERE position + 16 <= length(?1)
)
SELECT r.id, r.state, r.daemon_id FROM wanted JOIN requests AS r ON r.id = wanted.id
"""


def _fence(write: type[models.RequestWrite]) -> str:
    """The WHERE clause of a daemon's write (its last two parameters are the request and the daemon): the row
    is the daemon's and in a state the transition table lets the write apply from."""
    return f" WHERE id = ? AND daemon_id = ? AND {rows.state_predicate(transitions.DAEMON_WRITES[write].sources)}"


MARK_PROCESSING = "UPDATE requests SET state = 'processing', started_at = ?" + _fence(models.MarkProcessing)
COMPLETE = (
    "UPDATE requests SET state = 'completed', started_at = COALESCE(started_at, claimed_at), finished_at = ?, "
    "response_status = ?, response_body = ?, error_code = NULL, error_message = NULL, "
    "result_bytes = ? + custom_id_bytes" + _fence(models.Complete)
)
FAIL = (
    "UPDATE requests SET state = 'failed', started_at = COALESCE(started_at, claimed_at), finished_at = ?, "
    "response_status = ?, response_body = ?, "
    "error_code = ?, error_message = ?, result_bytes = ? + custom_id_bytes" + _fence(models.Fail)
)
RESCHEDULE = (
    "UPDATE requests SET state = 'pending', attempt = attempt + 1, not_before = ?, daemon_id = NULL, "
    "claimed_at = NULL, started_at = NULL, error_code = ?, error_message = ?" + _fence(models.Reschedule)
)
RELEASE = "UPDATE requests SET state = 'pending', daemon_id = NULL, claimed_at = NULL, started_at = NULL" + _fence(
    models.Release
)
CANCEL = (
    "UPDATE requests SET state = 'canceled', finished_at = ?, error_code = ?, error_message = ?, "
    "result_bytes = ? + custom_id_bytes" + _fence(models.Cancel)
)

# Cancel on return (`transitions.CANCEL_ON_RETURN_MARKS`): a request its daemon rescheduled or released while
# its batch is being cancelled (or was deleted) ends canceled instead of pending, in the same transaction.
CANCEL_RETURNED = f"""
UPDATE requests SET state = 'canceled', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE id = ? AND state = 'pending' AND EXISTS (
    SELECT 1 FROM batches AS b WHERE b.id = requests.batch_id AND ({rows.CANCEL_ON_RETURN})
)
"""
ADD_USAGE = """
INSERT INTO batch_usage (batch_id, model, day, daemon_id, owner, requests, unknown, input_tokens, cached_tokens,
    output_tokens, reasoning_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (batch_id, model, day, daemon_id) DO UPDATE SET
    requests = requests + excluded.requests,
    unknown = unknown + excluded.unknown,
    input_tokens = input_tokens + excluded.input_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens
"""
MICROSECONDS_PER_DAY: Final = 86_400_000_000
# Fail on return (`transitions.FAIL_ON_RETURN`): a request handed back to the queue of a batch that spent its
# budget.
FAIL_RETURNED = """
UPDATE requests SET state = 'failed', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE id = ? AND state = 'pending' AND EXISTS (
    SELECT 1 FROM batches AS b WHERE b.id = requests.batch_id AND b.budget_exceeded_at IS NOT NULL
)
"""
SELECT_OPEN_BUDGET = (
    "SELECT budget FROM batches WHERE id = ? AND budget IS NOT NULL AND budget_exceeded_at IS NULL"
)
STOP_BUDGET = "UPDATE batches SET budget_exceeded_at = ? WHERE id = ?"
# Budget stop (`transitions.BUDGET_STOP`).
FAIL_PENDING_OF_BATCH = """
UPDATE requests SET state = 'failed', finished_at = ?, error_code = ?, error_message = ?,
    result_bytes = ? + custom_id_bytes
WHERE batch_id = ? AND state = 'pending'
"""

_RETURNING_WRITES = tuple(
    kind for kind, transition in transitions.DAEMON_WRITES.items() if transition.returns_to_queue
)

ALLOWED_FROM: Final[dict[type[Any], frozenset[str]]] = {
    kind: frozenset(state.value for state in transition.sources)
    for kind, transition in transitions.DAEMON_WRITES.items()
}
"""The stored states each daemon write applies from (the transition table's), to sort out refused writes."""

NULL_BODY_BYTES: Final = len(b"null")


def apply_writes(
    connection: sqlite3.Connection,
    now: datetime,
    daemon_id: ids.DaemonId,
    writes: Sequence[models.RequestWrite],
) -> models.WriteReport:
    """Apply the writes whose request is owned by `daemon_id` and in an allowed state; report the others.

    Fast path: run every fenced UPDATE; if each one changed its row, all applied. Otherwise undo them (savepoint),
    read the current rows, and apply only the writes they allow (fenced again)."""
    moment = connections.to_micros(now)
    daemon_key = daemon_id.bytes
    connection.execute("SAVEPOINT writes")
    if _update(connection, moment, daemon_key, writes) == len(writes):
        connection.execute("RELEASE writes")
        _add_usage(connection, moment, daemon_key, writes)
        return models.WriteReport(applied=frozenset(write.request_id for write in writes))
    connection.execute("ROLLBACK TO writes")
    connection.execute("RELEASE writes")
    keys = b"".join(write.request_id.bytes for write in writes)
    current = {key: (state, daemon) for key, state, daemon in connection.execute(SELECT_CURRENT, (keys,))}
    applied: list[models.RequestWrite] = []
    conflicts: dict[ids.RequestId, states.RequestState] = {}
    missing: set[ids.RequestId] = set()
    for write in writes:
        found = current.get(write.request_id.bytes)
        if found is None:
            missing.add(write.request_id)
        elif found[1] != daemon_key or found[0] not in ALLOWED_FROM[type(write)]:
            conflicts[write.request_id] = states.RequestState(found[0])
        else:
            applied.append(write)
    _update(connection, moment, daemon_key, applied)
    _add_usage(connection, moment, daemon_key, applied)
    return models.WriteReport(
        applied=frozenset(write.request_id for write in applied),
        conflicts=conflicts,
        missing=frozenset(missing),
    )


def _update(connection: sqlite3.Connection, now: int, daemon: bytes, writes: Sequence[models.RequestWrite]) -> int:
    """Run the fenced UPDATEs, one `executemany` per kind of write; returns how many rows changed."""
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for write in writes:
        sql, parameters = _statement(write, now)
        groups.setdefault(sql, []).append((*parameters, write.request_id.bytes, daemon))
    changed = sum(connection.executemany(sql, rows).rowcount for sql, rows in groups.items())
    returned = [write.request_id.bytes for write in writes if isinstance(write, _RETURNING_WRITES)]
    if returned:
        cancelled = (lines.BATCH_CANCELLED, lines.CANCELLED_MESSAGE, lines.CANCELLED_LINE_BYTES)
        connection.executemany(CANCEL_RETURNED, [(now, *cancelled, key) for key in returned])
        spent = (lines.BUDGET_EXCEEDED, lines.BUDGET_MESSAGE, lines.BUDGET_LINE_BYTES)
        connection.executemany(FAIL_RETURNED, [(now, *spent, key) for key in returned])
    return changed


def _add_usage(
    connection: sqlite3.Connection, now: int, daemon: bytes, applied: Sequence[models.RequestWrite]
) -> None:
    """Add the usage of the applied `Complete` writes to this daemon's rows of today (UTC)."""
    sums = usage_sums(applied)
    if sums:
        day = now // MICROSECONDS_PER_DAY
        connection.executemany(
            ADD_USAGE,
            [
                (
                    total.batch_id.bytes,
                    total.model,
                    day,
                    daemon,
                    total.owner,
                    total.requests,
                    total.unknown,
                    total.input_tokens,
                    total.cached_tokens,
                    total.output_tokens,
                    total.reasoning_tokens,
                )
                for total in sums
            ],
        )
        _stop_spent_budgets(connection, now, {total.batch_id for total in sums})


def _stop_spent_budgets(connection: sqlite3.Connection, now: int, batch_ids: set[ids.BatchId]) -> None:
    """Budget stop: of the batches whose usage just grew, those with a budget now reached get
    `budget_exceeded_at`, and their pending requests end failed (`budget_exceeded`)."""
    for batch_id in batch_ids:
        key = batch_id.bytes
        found = connection.execute(SELECT_OPEN_BUDGET, (key,)).fetchone()
        if found is None:
            continue  # no budget, or already stopped
        budget = budgets.from_document(orjson.loads(found[0]))
        spent = [rows.model_usage(found) for found in connection.execute(batches.SELECT_USAGE, (key,))]
        if budget is not None and budget.reached(spent):
            connection.execute(STOP_BUDGET, (now, key))
            failed = (lines.BUDGET_EXCEEDED, lines.BUDGET_MESSAGE, lines.BUDGET_LINE_BYTES)
            connection.execute(FAIL_PENDING_OF_BATCH, (now, *failed, key))


def _statement(write: models.RequestWrite, now: int) -> tuple[str, tuple[Any, ...]]:
    """The fenced UPDATE of one write and its parameters before `id, daemon_id`."""
    match write:
        case models.MarkProcessing():
            return MARK_PROCESSING, (now,)
        case models.Complete(status_code=status, body=body):
            return COMPLETE, (now, status, body, lines.response_line_bytes(0, status, lines.utf8_size(body)))
        case models.Fail(status_code=int() as status, body=body):
            size = NULL_BODY_BYTES if body is None else lines.utf8_size(body)
            return FAIL, (now, status, body, None, None, lines.response_line_bytes(0, status, size))
        case models.Fail(code=code, message=message):
            code = code or "error"
            message = message or lines.default_message(code)
            return FAIL, (now, None, None, code, message, lines.error_line_bytes(0, code, message))
        case models.Reschedule(not_before=not_before, code=code, message=message):
            return RESCHEDULE, (connections.to_micros(not_before), code, message)
        case models.Release():
            return RELEASE, ()
        case models.Cancel():
            return CANCEL, (now, lines.BATCH_CANCELLED, lines.CANCELLED_MESSAGE, lines.CANCELLED_LINE_BYTES)
    raise TypeError(f"Unknown request write {write!r}.")
