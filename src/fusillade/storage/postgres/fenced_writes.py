"""Fenced request writes of one daemon, group-committed: ONE statement whose data-modifying CTEs update each
kind of command present from arrays (one UPDATE per kind, never one per row). Each UPDATE applies only to rows
owned by the daemon and in the states its command applies from (`transitions.DAEMON_WRITES`, rendered by
`rows.state_predicate`); the ids it returns are the writes applied."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fusillade.domain import ids, lines, models, states, transitions
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection


def _literal(text: str) -> str:
    """`text` as an SQL string literal (for the constants written into a statement)."""
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class _Kind:
    """One command kind: its write command, the columns of its array source `w` and its UPDATE (`{source}` is
    the unnest)."""

    write: type[models.RequestWrite]
    columns: tuple[tuple[str, str], ...]
    update: str


def _kind(write: type[models.RequestWrite], columns: tuple[tuple[str, str], ...], update: str) -> _Kind:
    """A kind whose UPDATE applies only to rows of the daemon ($1) in the states `write` applies from (`{fence}`
    in `update`)."""
    fence = f"r.daemon_id = $1 AND {rows.state_predicate(transitions.DAEMON_WRITES[write].sources)}"
    return _Kind(write, columns, update.format(source="{source}", fence=fence))


# $1 = daemon id, $2 = now; one jsonb parameter per kind present follows from $3 (see `_statement`).
_KINDS = {
    "processing": _kind(
        models.MarkProcessing,
        (("id", "uuid"),),
        """
        UPDATE requests r SET started_at = $2
        FROM {source}
        WHERE r.id = w.id AND {fence}
        RETURNING r.id
        """,
    ),
    "completed": _kind(
        models.Complete,
        (
            ("id", "uuid"),
            ("status", "integer"),
            ("body", "text"),
            ("line_bytes", "bigint"),
            # The usage (`_usage_values`): input NULL, not counted; -1, usage unknown. Trailing zeros are left out
            # of a row (a missing element reads as NULL), so a usage without cached or reasoning tokens, the
            # common case, costs two elements.
            ("input_tokens", "bigint"),
            ("output_tokens", "bigint"),
            ("cached_tokens", "bigint"),
            ("reasoning_tokens", "bigint"),
        ),
        """
        UPDATE requests r
        SET state = 'completed', started_at = COALESCE(r.started_at, r.claimed_at), finished_at = $2,
            response_status = w.status, response_body = w.body, error_code = NULL, error_message = NULL,
            result_bytes = r.custom_id_bytes + w.line_bytes
        FROM {source}
        WHERE r.id = w.id AND {fence}
        RETURNING r.id, r.batch_id, r.model, r.owner, w.input_tokens, w.output_tokens, w.cached_tokens,
            w.reasoning_tokens
        """,
    ),
    "failed": _kind(
        models.Fail,
        (
            ("id", "uuid"),
            ("status", "integer"),
            ("body", "text"),
            ("code", "text"),
            ("message", "text"),
            ("line_bytes", "bigint"),
        ),
        """
        UPDATE requests r
        SET state = 'failed', started_at = COALESCE(r.started_at, r.claimed_at), finished_at = $2,
            response_status = w.status, response_body = w.body,
            error_code = w.code, error_message = w.message, result_bytes = r.custom_id_bytes + w.line_bytes
        FROM {source}
        WHERE r.id = w.id AND {fence}
        RETURNING r.id
        """,
    ),
    "rescheduled": _kind(
        models.Reschedule,
        (("id", "uuid"), ("not_before", "timestamptz"), ("code", "text"), ("message", "text")),
        """
        UPDATE requests r
        SET state = 'pending', attempt = r.attempt + 1, not_before = w.not_before, daemon_id = NULL,
            claimed_at = NULL, started_at = NULL, error_code = w.code, error_message = w.message
        FROM {source}
        WHERE r.id = w.id AND {fence}
        RETURNING r.id
        """,
    ),
    "released": _kind(
        models.Release,
        (("id", "uuid"),),
        """
        UPDATE requests r SET state = 'pending', daemon_id = NULL, claimed_at = NULL, started_at = NULL
        FROM {source}
        WHERE r.id = w.id AND {fence}
        RETURNING r.id
        """,
    ),
    "canceled": _kind(
        models.Cancel,
        (("id", "uuid"), ("code", "text"), ("message", "text"), ("line_bytes", "bigint")),
        """
        UPDATE requests r
        SET state = 'canceled', finished_at = $2, response_status = NULL, response_body = NULL,
            error_code = w.code, error_message = w.message, result_bytes = r.custom_id_bytes + w.line_bytes
        FROM {source}
        WHERE r.id = w.id AND {fence}
        RETURNING r.id
        """,
    ),
}

# The usage of the `Complete` writes that applied (the rows `completed` returns), added to this daemon's rows of
# the day (UTC) in the same statement: no trip of its own, and a refused write adds nothing. A row per daemon and
# database session (`pg_backend_pid()`), so that neither replicas nor this daemon's own ticks in flight (each on
# its own connection) wait on each other's row lock. A usage of null counts the request as usage unknown.
_ADD_USAGE = """
INSERT INTO batch_usage AS u (batch_id, model, day, daemon_id, shard, owner, requests, unknown, input_tokens,
    cached_tokens, output_tokens, reasoning_tokens)
SELECT c.batch_id, c.model, ($2::timestamptz AT TIME ZONE 'UTC')::date, $1::uuid, pg_backend_pid(), c.owner,
       count(*) FILTER (WHERE c.input_tokens >= 0), count(*) FILTER (WHERE c.input_tokens < 0),
       COALESCE(sum(c.input_tokens) FILTER (WHERE c.input_tokens >= 0), 0), COALESCE(sum(c.cached_tokens), 0),
       COALESCE(sum(c.output_tokens), 0), COALESCE(sum(c.reasoning_tokens), 0)
FROM completed c
WHERE c.input_tokens IS NOT NULL
GROUP BY c.batch_id, c.model, c.owner
ON CONFLICT (batch_id, model, day, daemon_id, shard) DO UPDATE SET
    requests = u.requests + excluded.requests,
    unknown = u.unknown + excluded.unknown,
    input_tokens = u.input_tokens + excluded.input_tokens,
    cached_tokens = u.cached_tokens + excluded.cached_tokens,
    output_tokens = u.output_tokens + excluded.output_tokens,
    reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens
"""

# Budget stop (`transitions.BUDGET_STOP`), in the same statement: of the batches with a budget not yet reached
# whose usage `completed` adds to, those that reach it (their stored sums, as of the statement's snapshot, plus
# this statement's) get `budget_exceeded_at`, and their pending requests end failed. Prices come from the
# budget's own document (`storage/budgets.py`), fixed at the batch's creation.
_STOP_SPENT_BUDGETS = f"""
budgeted AS (
    SELECT b.id, b.budget
    FROM batches b
    WHERE b.id IN (SELECT c.batch_id FROM completed c WHERE c.input_tokens >= 0)
      AND b.budget IS NOT NULL AND b.budget_exceeded_at IS NULL
),
spent AS (
    SELECT x.batch_id, x.model, sum(x.input_tokens) AS input_tokens, sum(x.cached_tokens) AS cached_tokens,
           sum(x.output_tokens) AS output_tokens
    FROM (
        SELECT u.batch_id, u.model, u.input_tokens, u.cached_tokens, u.output_tokens
        FROM batch_usage u WHERE u.batch_id IN (SELECT id FROM budgeted)
        UNION ALL
        SELECT c.batch_id, c.model, c.input_tokens, COALESCE(c.cached_tokens, 0), c.output_tokens
        FROM completed c
        WHERE c.input_tokens >= 0 AND c.batch_id IN (SELECT id FROM budgeted)
    ) x
    GROUP BY x.batch_id, x.model
),
over_budget AS (
    SELECT b.id
    FROM budgeted b JOIN spent s ON s.batch_id = b.id
    GROUP BY b.id, b.budget
    HAVING sum(s.input_tokens + s.output_tokens) >= (b.budget ->> 'max_total_tokens')::bigint
        OR sum(((s.input_tokens - s.cached_tokens) * (b.budget -> 'prices' -> s.model ->> 0)::numeric
                + s.cached_tokens * (b.budget -> 'prices' -> s.model ->> 1)::numeric
                + s.output_tokens * (b.budget -> 'prices' -> s.model ->> 2)::numeric) / 1000000)
           >= (b.budget ->> 'max_cost')::numeric
),
budget_stopped AS (
    UPDATE batches b SET budget_exceeded_at = $2
    FROM over_budget o
    WHERE b.id = o.id AND b.budget_exceeded_at IS NULL
),
budget_failed AS (
    UPDATE requests r
    SET state = 'failed', finished_at = $2, error_code = {_literal(lines.BUDGET_EXCEEDED)},
        error_message = {_literal(lines.BUDGET_MESSAGE)},
        result_bytes = r.custom_id_bytes + {lines.BUDGET_LINE_BYTES}
    FROM over_budget o
    WHERE r.batch_id = o.id AND r.state = 'pending'
)
"""

# Fail on return (`transitions.FAIL_ON_RETURN`): a request its daemon rescheduled or released after its batch spent
# its budget ends failed instead of pending, in the same transaction (after cancel on return, which comes first).
_FAIL_RETURNED = """
UPDATE requests r
SET state = 'failed', finished_at = $2, error_code = $3, error_message = $4, result_bytes = r.custom_id_bytes + $5
FROM batches b
WHERE r.id = ANY($1::uuid[]) AND r.state = 'pending' AND b.id = r.batch_id AND b.budget_exceeded_at IS NOT NULL
"""

# Cancel on return (`transitions.CANCEL_ON_RETURN_MARKS`): a request its daemon rescheduled or released while
# its batch is being cancelled (or was deleted) ends canceled instead of pending, in the same transaction.
_CANCEL_RETURNED = f"""
UPDATE requests r
SET state = 'canceled', finished_at = $2, error_code = $3, error_message = $4,
    result_bytes = r.custom_id_bytes + $5
FROM batches b
WHERE r.id = ANY($1::uuid[]) AND r.state = 'pending' AND b.id = r.batch_id
  AND ({rows.CANCEL_ON_RETURN})
"""
_RETURNING_WRITES = tuple(
    kind for kind, transition in transitions.DAEMON_WRITES.items() if transition.returns_to_queue
)
_RETURNING_KINDS = frozenset(
    name for name, kind in _KINDS.items() if transitions.DAEMON_WRITES[kind.write].returns_to_queue
)

_CURRENT_STATES = f"SELECT r.id, {rows.STATE_EXPRESSION} AS state FROM requests r WHERE r.id = ANY($1::uuid[])"


class BudgetedBatches:
    """Which batches have a budget, as far as this process's writes have met them: a batch's budget is set when it
    is created and never changes, so each batch is looked up once (one trip, the first time a `Complete` of it is
    written), and the write statement checks budgets only when one of its batches has one."""

    MAX_REMEMBERED = 10_000
    """Batches remembered at most (the oldest half is forgotten beyond: looked up again if met again)."""

    def __init__(self) -> None:
        self._budgeted: dict[ids.BatchId, bool] = {}

    async def any_of(self, connection: Connection, writes: Sequence[models.RequestWrite]) -> bool:
        """Whether a batch of the `Complete`s among `writes` has a budget."""
        known = self._budgeted
        batch_ids = {write.spend.batch_id for write in writes if type(write) is models.Complete and write.spend}
        unknown = [batch_id for batch_id in batch_ids if batch_id not in known]
        if unknown:
            if len(known) + len(unknown) > self.MAX_REMEMBERED:
                for forgotten in list(known)[: len(known) // 2]:
                    del known[forgotten]
            found = {row[0]: row[1] for row in await connection.fetch(_BUDGETED, unknown)}
            for batch_id in unknown:
                known[batch_id] = found.get(batch_id, False)
        return any(known[batch_id] for batch_id in batch_ids)


_BUDGETED = "SELECT id, budget IS NOT NULL FROM batches WHERE id = ANY($1::uuid[])"


@functools.cache
def _statement(kinds: tuple[str, ...], budgets: bool) -> str:
    """The statement for the kinds present in a call, with the budget check when `budgets` (at most 126 variants,
    each prepared once)."""
    # Declares the types of $1 and $2 even when no update of the call uses them.
    parts = ["arguments AS (SELECT $1::uuid AS daemon_id, $2::timestamptz AS now)"]
    # Each kind's writes travel as ONE jsonb parameter, an array of rows (arrays of the kind's columns): the
    # driver encodes a string at once, where it checks every element of array parameters in Python.
    for number, name in enumerate(kinds, start=3):
        kind = _KINDS[name]
        columns = ", ".join(
            f"(v ->> {index})::{type_name} AS {column}" for index, (column, type_name) in enumerate(kind.columns)
        )
        source = f"(SELECT {columns} FROM jsonb_array_elements(${number}::jsonb) AS v) AS w"
        parts.append(f"{name} AS ({kind.update.format(source=source)})")
    if "completed" in kinds:
        parts.append(f"usage AS ({_ADD_USAGE})")
        if budgets:
            parts.append(_STOP_SPENT_BUDGETS)
    selects = " UNION ALL ".join(f"SELECT id FROM {name}" for name in kinds)
    return f"WITH {', '.join(parts)} {selects}"


def _row(write: models.RequestWrite) -> tuple[str, tuple[Any, ...]]:
    """The kind of a write and its values, in the order of the kind's columns."""
    match write:
        case models.MarkProcessing():
            return "processing", (write.request_id,)
        case models.Complete(spend=spend):
            line_bytes = _response_bytes(write.status_code, write.body)
            return "completed", (
                write.request_id,
                write.status_code,
                write.body,
                line_bytes,
                *_usage_values(spend),
            )
        case models.Fail(status_code=int(status_code)):
            line_bytes = _response_bytes(status_code, write.body)
            return "failed", (write.request_id, status_code, write.body, None, None, line_bytes)
        case models.Fail():
            code = write.code or "error"
            message = write.message or lines.default_message(code)
            return "failed", (
                write.request_id,
                None,
                None,
                code,
                message,
                lines.error_line_bytes(0, code, message),
            )
        case models.Reschedule():
            return "rescheduled", (write.request_id, write.not_before, write.code, write.message)
        case models.Release():
            return "released", (write.request_id,)
        case models.Cancel():
            return "canceled", (
                write.request_id,
                lines.BATCH_CANCELLED,
                lines.CANCELLED_MESSAGE,
                lines.CANCELLED_LINE_BYTES,
            )


def _usage_values(spend: models.Spend | None) -> tuple[int, ...]:
    """The usage columns of a `Complete`'s row: none (not counted), -1 (usage unknown), or input and output tokens
    with cached and reasoning tokens only when one of them is not 0."""
    if spend is None:
        return ()
    usage = spend.usage
    if usage is None:
        return (-1,)
    if usage.cached_tokens or usage.reasoning_tokens:
        return (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens)
    return (usage.input_tokens, usage.output_tokens)


def _response_bytes(status: int, body: str | None) -> int:
    """Size of a result line with a response, without its custom_id (a missing body renders as `null`)."""
    return lines.response_line_bytes(0, status, 4 if body is None else lines.utf8_size(body))


def named_requests(writes: Sequence[models.RequestWrite]) -> frozenset[ids.RequestId]:
    """The requests the writes name; `ValueError` if two writes name the same request."""
    named = frozenset(write.request_id for write in writes)
    if len(named) < len(writes):
        seen: set[ids.RequestId] = set()
        for write in writes:
            if write.request_id in seen:
                raise ValueError(f"Two writes for request {ids.request_wire(write.request_id)} in one call.")
            seen.add(write.request_id)
    return named


async def apply_writes(
    connection: Connection,
    daemon_id: ids.DaemonId,
    writes: Sequence[models.RequestWrite],
    named: frozenset[ids.RequestId],
    *,
    now: datetime,
    budgeted: BudgetedBatches,
) -> models.WriteReport:
    """Apply the writes (naming the requests `named`, see `named_requests`) in one statement, then read the
    state of the refused ones. A `Reschedule` or `Release` takes a second statement: then both run in one
    transaction. Budgets are checked when a batch of the writes has one (`budgeted` says)."""
    budgets = await budgeted.any_of(connection, writes)
    if any(isinstance(write, _RETURNING_WRITES) for write in writes):
        async with connection.transaction():
            return await _apply_writes(connection, daemon_id, writes, named, now=now, budgets=budgets)
    return await _apply_writes(connection, daemon_id, writes, named, now=now, budgets=budgets)


async def _apply_writes(
    connection: Connection,
    daemon_id: ids.DaemonId,
    writes: Sequence[models.RequestWrite],
    named: frozenset[ids.RequestId],
    *,
    now: datetime,
    budgets: bool,
) -> models.WriteReport:
    by_kind: dict[str, list[tuple[Any, ...]]] = {}
    for write in writes:
        name, values = _row(write)
        by_kind.setdefault(name, []).append(values)
    kinds = tuple(name for name in _KINDS if name in by_kind)
    arguments = [by_kind[name] for name in kinds]
    found = await connection.fetch(_statement(kinds, budgets), daemon_id, now, *arguments)
    # Each updated row is returned once: as many rows as writes means that every write applied.
    if len(found) == len(writes):
        applied, refused = named, []
    else:
        # The driver's UUIDs hash and compare like the caller's, so the report can hold the caller's own ids.
        returned = {row[0] for row in found}
        applied = frozenset(write.request_id for write in writes if write.request_id in returned)
        refused = [write.request_id for write in writes if write.request_id not in returned]
    returned_to_queue = (
        [
            write.request_id
            for write in writes
            if isinstance(write, _RETURNING_WRITES) and write.request_id in applied
        ]
        if not _RETURNING_KINDS.isdisjoint(by_kind)
        else []
    )
    if returned_to_queue:
        await connection.execute(
            _CANCEL_RETURNED,
            returned_to_queue,
            now,
            lines.BATCH_CANCELLED,
            lines.CANCELLED_MESSAGE,
            lines.CANCELLED_LINE_BYTES,
        )
        await connection.execute(
            _FAIL_RETURNED,
            returned_to_queue,
            now,
            lines.BUDGET_EXCEEDED,
            lines.BUDGET_MESSAGE,
            lines.BUDGET_LINE_BYTES,
        )
    if not refused:
        return models.WriteReport(applied=applied)
    current = {
        row["id"]: states.RequestState(row["state"]) for row in await connection.fetch(_CURRENT_STATES, refused)
    }
    return models.WriteReport(
        applied=applied,
        conflicts={request_id: current[request_id] for request_id in refused if request_id in current},
        missing=frozenset(request_id for request_id in refused if request_id not in current),
    )
