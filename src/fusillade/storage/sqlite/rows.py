"""Rows of the SQLite tables, and their mapping to the frozen records of `domain.models` (aware UTC datetimes,
UUID ids).

Each `*Row` names the columns of one table in select order; its `COLUMNS` constant is the matching select list,
so a query and the code reading its rows cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final, NamedTuple

import orjson

from fusillade.domain import ids, models, states, transitions
from fusillade.domain.usage import Usage
from fusillade.storage import budgets, refusals
from fusillade.storage.sqlite import connection as connections

# Requests the store itself ends (cancel, expiry, reclaim): their message, and the size of their error line
# without the custom id (the SQL adds each row's `custom_id_bytes`).

_micros = connections.from_micros
_micros_or_none = connections.from_micros_or_none
_uuid = connections.to_uuid


def owner_matches(row_owner: str, owner: models.OwnerScope) -> bool:
    return owner is models.ALL_OWNERS or row_owner == owner


# ------------------------------------------------------------------------------------------------ files


class FileRow(NamedTuple):
    id: bytes
    owner: str
    filename: str
    purpose: str
    size_bytes: int
    request_count: int
    batch_id: bytes | None
    created_at: int
    expires_at: int | None
    deleted_at: int | None

    @property
    def is_input(self) -> bool:
        return self.purpose == states.FilePurpose.BATCH.value or self.batch_id is None


FILE_COLUMNS: Final = ", ".join(FileRow._fields)


def file_from_row(row: FileRow, *, size: int | None = None, count: int | None = None) -> models.File:
    """A file; `size` and `count` replace the stored values (output and error files are measured)."""
    return models.File(
        id=ids.FileId(_uuid(row.id)),
        owner=row.owner,
        filename=row.filename,
        purpose=states.FilePurpose(row.purpose),
        bytes=row.size_bytes if size is None else size,
        request_count=row.request_count if count is None else count,
        batch_id=None if row.batch_id is None else ids.BatchId(_uuid(row.batch_id)),
        created_at=_micros(row.created_at),
        expires_at=_micros_or_none(row.expires_at),
    )


class TemplateRow(NamedTuple):
    id: bytes
    file_id: bytes
    line_number: int
    custom_id: str
    method: str
    url: str
    model: str
    body: str


TEMPLATE_COLUMNS: Final = ", ".join(TemplateRow._fields)


def template_from_row(row: TemplateRow) -> models.RequestTemplate:
    return models.RequestTemplate(
        id=ids.TemplateId(_uuid(row.id)),
        file_id=ids.FileId(_uuid(row.file_id)),
        line_number=row.line_number,
        custom_id=row.custom_id,
        method=row.method,
        url=row.url,
        model=row.model,
        body=row.body,
    )


# ---------------------------------------------------------------------------------------------- batches


class BatchRow(NamedTuple):
    id: bytes
    owner: str
    input_file_id: bytes
    output_file_id: bytes
    error_file_id: bytes
    endpoint: str
    completion_window: str
    metadata: str | None
    total_requests: int
    created_at: int
    expires_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    deleted_at: int | None
    errors: str | None
    model: str | None
    budget: str | None
    budget_exceeded_at: int | None

    @property
    def is_finished(self) -> bool:
        """Completed, failed, expired or cancelled (not merely cancelling)."""
        return any(
            moment is not None
            for moment in (self.completed_at, self.failed_at, self.expired_at, self.cancelled_at)
        )


BATCH_COLUMNS: Final = ", ".join(BatchRow._fields)


def counts_from_rows(total: int, rows: Iterable[tuple[str, int]]) -> models.RequestCounts:
    """Counts of a batch from `(state, count)` rows of its requests not in flight (the rest are in flight)."""
    by_state = dict(rows)
    return models.RequestCounts(
        total=total,
        pending=by_state.get("pending", 0),
        in_progress=total - sum(by_state.values()),
        completed=by_state.get("completed", 0),
        failed=by_state.get("failed", 0),
        canceled=by_state.get("canceled", 0),
    )


def model_usage(row: Sequence[Any]) -> models.ModelUsage:
    """A `(model, requests, unknown, input, cached, output, reasoning)` row of summed usage."""
    model, requests, unknown, *tokens = row
    return models.ModelUsage(model=model, requests=requests, unknown=unknown, usage=Usage(*tokens))


def batch_from_row(
    row: BatchRow, counts: models.RequestCounts, usage: Sequence[models.ModelUsage] = ()
) -> models.Batch:
    return models.Batch(
        id=ids.BatchId(_uuid(row.id)),
        owner=row.owner,
        input_file_id=ids.FileId(_uuid(row.input_file_id)),
        output_file_id=ids.FileId(_uuid(row.output_file_id)),
        error_file_id=ids.FileId(_uuid(row.error_file_id)),
        endpoint=row.endpoint,
        completion_window=row.completion_window,
        metadata=None if row.metadata is None else orjson.loads(row.metadata),
        created_at=_micros(row.created_at),
        expires_at=_micros(row.expires_at),
        in_progress_at=_micros_or_none(row.in_progress_at),
        finalizing_at=_micros_or_none(row.finalizing_at),
        completed_at=_micros_or_none(row.completed_at),
        failed_at=_micros_or_none(row.failed_at),
        expired_at=_micros_or_none(row.expired_at),
        cancelling_at=_micros_or_none(row.cancelling_at),
        cancelled_at=_micros_or_none(row.cancelled_at),
        errors=refusals.batch_errors(None if row.errors is None else orjson.loads(row.errors)),
        counts=counts,
        model=row.model,
        usage=usage,
        budget=None if row.budget is None else budgets.from_document(orjson.loads(row.budget)),
        budget_exceeded_at=_micros_or_none(row.budget_exceeded_at),
    )


# --------------------------------------------------------------------------------------------- requests


class RequestRow(NamedTuple):
    id: bytes
    batch_id: bytes
    template_id: bytes
    owner: str
    custom_id: str
    model: str
    line_number: int
    state: str
    attempt: int
    not_before: int | None
    daemon_id: bytes | None
    claimed_at: int | None
    started_at: int | None
    finished_at: int | None
    response_status: int | None
    response_body: str | None
    error_code: str | None
    error_message: str | None


REQUEST_COLUMNS: Final = ", ".join(RequestRow._fields)


def request_from_row(row: RequestRow) -> models.Request:
    return models.Request(
        id=ids.RequestId(_uuid(row.id)),
        batch_id=ids.BatchId(_uuid(row.batch_id)),
        template_id=ids.TemplateId(_uuid(row.template_id)),
        owner=row.owner,
        custom_id=row.custom_id,
        model=row.model,
        line_number=row.line_number,
        state=states.RequestState(row.state),
        attempt=row.attempt,
        not_before=_micros_or_none(row.not_before),
        daemon_id=None if row.daemon_id is None else ids.DaemonId(_uuid(row.daemon_id)),
        claimed_at=_micros_or_none(row.claimed_at),
        started_at=_micros_or_none(row.started_at),
        finished_at=_micros_or_none(row.finished_at),
        response_status=row.response_status,
        response_body=row.response_body,
        error_code=row.error_code,
        error_message=row.error_message,
    )


# ---------------------------------------------------------------------------------------------- daemons


class DaemonRow(NamedTuple):
    id: bytes
    hostname: str
    pid: int
    version: str
    status: str
    started_at: int
    last_heartbeat: int
    stopped_at: int | None
    in_flight: int
    limits: str | None


DAEMON_COLUMNS: Final = ", ".join(DaemonRow._fields)


def daemon_from_row(row: DaemonRow) -> models.DaemonRecord:
    return models.DaemonRecord(
        id=ids.DaemonId(_uuid(row.id)),
        hostname=row.hostname,
        pid=row.pid,
        version=row.version,
        status=states.DaemonStatus(row.status),
        started_at=_micros(row.started_at),
        last_heartbeat=_micros(row.last_heartbeat),
        stopped_at=_micros_or_none(row.stopped_at),
        in_flight=row.in_flight,
        limits=orjson.loads(row.limits) if row.limits else {},
    )


def state_predicate(allowed: Collection[states.RequestState], *, alias: str = "") -> str:
    """The condition on a request row (of table alias `alias`, if any) that holds when its state is one of
    `allowed` (a set of the transition table, `domain.transitions`): `state = '…'` or `state IN ('…', …)` (in the
    order of `RequestState`; `FALSE` for no state). SQLite stores every state under its own name."""
    if not allowed:
        return "FALSE"
    column = f"{alias}.state" if alias else "state"
    values = [f"'{state.value}'" for state in states.RequestState if state in allowed]
    return f"{column} = {values[0]}" if len(values) == 1 else f"{column} IN ({', '.join(values)})"


CANCEL_ON_RETURN = " OR ".join(f"b.{mark} IS NOT NULL" for mark in transitions.CANCEL_ON_RETURN_MARKS)
"""The condition on batch `b` under which a request handed back to the queue ends canceled instead
(`transitions.CANCEL_ON_RETURN_MARKS`): its batch is being cancelled or was deleted."""
