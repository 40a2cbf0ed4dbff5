"""Row -> domain record mapping for the PostgreSQL backend, and the column lists the queries select."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

import asyncpg

from fusillade.domain import ids, models, states, transitions
from fusillade.domain.usage import Usage
from fusillade.storage import budgets, refusals

FILE_COLUMNS = """
    f.id, f.owner, f.filename, f.purpose, f.created_at, f.expires_at, f.batch_id,
    CASE WHEN f.purpose = 'batch' THEN f.size_bytes ELSE v.bytes END AS bytes,
    CASE WHEN f.purpose = 'batch' THEN f.request_count ELSE v.lines END AS request_count
"""

FILE_SOURCE = """
    files f
    CROSS JOIN LATERAL (
        SELECT COALESCE(sum(r.result_bytes), 0)::bigint AS bytes, count(*)::integer AS lines
        FROM requests r
        WHERE f.purpose <> 'batch'
          AND r.batch_id = f.batch_id
          AND r.state <> 'in_flight'  -- lets requests_batch_state serve
          AND r.state = ANY(CASE WHEN f.purpose = 'batch_output' THEN '{completed}'::text[]
                                 ELSE '{failed,canceled}'::text[] END)
    ) v
"""
"""`files f` with the rendered size and line count of virtual (output/error) files."""

FILE_VISIBLE = "(f.purpose = 'batch' OR v.lines > 0)"
"""A batch's output or error file exists for its owner once it has a line (as on OpenAI, where `output_file_id`
and `error_file_id` stay null until then): an empty one is neither listed nor found."""

BATCH_COLUMNS = """
    b.id, b.owner, b.input_file_id, b.output_file_id, b.error_file_id, b.endpoint, b.completion_window,
    b.metadata, b.created_at, b.expires_at, b.in_progress_at, b.finalizing_at, b.completed_at, b.failed_at,
    b.expired_at, b.cancelling_at, b.cancelled_at, b.errors, b.total_requests,
    c.pending, b.total_requests - c.not_in_flight AS in_progress, c.completed, c.failed, c.canceled,
    b.model, u.usage, b.budget, b.budget_exceeded_at
"""

BATCH_SOURCE = """
    batches b
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE r.state = 'pending')::integer AS pending,
               count(*) FILTER (WHERE r.state = 'completed')::integer AS completed,
               count(*) FILTER (WHERE r.state = 'failed')::integer AS failed,
               count(*) FILTER (WHERE r.state = 'canceled')::integer AS canceled,
               count(*)::integer AS not_in_flight
        FROM requests r
        WHERE r.batch_id = b.id AND r.state <> 'in_flight'
    ) c
    CROSS JOIN LATERAL (
        SELECT jsonb_agg(jsonb_build_array(m.model, m.requests, m.unknown, m.input_tokens, m.cached_tokens,
                                           m.output_tokens, m.reasoning_tokens) ORDER BY m.model) AS usage
        FROM (
            SELECT bu.model, sum(bu.requests)::bigint AS requests, sum(bu.unknown)::bigint AS unknown,
                   sum(bu.input_tokens)::bigint AS input_tokens, sum(bu.cached_tokens)::bigint AS cached_tokens,
                   sum(bu.output_tokens)::bigint AS output_tokens,
                   sum(bu.reasoning_tokens)::bigint AS reasoning_tokens
            FROM batch_usage bu
            WHERE bu.batch_id = b.id
            GROUP BY bu.model
        ) m
    ) u
"""
"""`batches b` with the request counts and the usage by model (`u.usage`: rows of `[model, requests, unknown,
input, cached, output, reasoning]`, or null) of each batch. A batch has exactly `total_requests` requests, and
requests_batch_state leaves out the in-flight ones: their count is what the other states leave."""

STATE_EXPRESSION = """
    CASE WHEN r.state <> 'in_flight' THEN r.state WHEN r.started_at IS NULL THEN 'claimed' ELSE 'processing' END
"""
"""The domain state of request `r`. Storage keeps `claimed` and `processing` as one state, `in_flight`, told
apart by `started_at`: marking a request processing then changes no indexed column, so PostgreSQL updates the
row in place (a HOT update, no index entries) on the hottest write path."""

REQUEST_COLUMNS = f"""
    r.id, r.batch_id, r.template_id, r.owner, r.custom_id, r.model, r.line_number, {STATE_EXPRESSION} AS state,
    r.attempt,
    r.not_before, r.daemon_id, r.claimed_at, r.started_at, r.finished_at, r.response_status,
    r.response_body, r.error_code, r.error_message
"""

TEMPLATE_COLUMNS = "t.id, t.file_id, t.line_number, t.custom_id, t.method, t.url, t.model, t.body"

DAEMON_COLUMNS = """
    d.id, d.hostname, d.pid, d.version, d.status, d.started_at, d.last_heartbeat, d.stopped_at, d.in_flight,
    d.limits
"""


def plain_uuid(value: Any) -> uuid.UUID:
    # asyncpg's UUID subclasses uuid.UUID; a plain one keeps records simple to compare, hash and pickle.
    return uuid.UUID(int=value.int)


def file_from_row(row: asyncpg.Record) -> models.File:
    batch_id = row["batch_id"]
    return models.File(
        id=ids.FileId(plain_uuid(row["id"])),
        owner=row["owner"],
        filename=row["filename"],
        purpose=states.FilePurpose(row["purpose"]),
        bytes=int(row["bytes"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        request_count=int(row["request_count"]),
        batch_id=None if batch_id is None else ids.BatchId(plain_uuid(batch_id)),
    )


def _metadata(value: Any) -> Mapping[str, str] | None:
    return None if value is None else dict(value)


def batch_from_row(row: asyncpg.Record) -> models.Batch:
    return models.Batch(
        id=ids.BatchId(plain_uuid(row["id"])),
        owner=row["owner"],
        input_file_id=ids.FileId(plain_uuid(row["input_file_id"])),
        output_file_id=ids.FileId(plain_uuid(row["output_file_id"])),
        error_file_id=ids.FileId(plain_uuid(row["error_file_id"])),
        endpoint=row["endpoint"],
        completion_window=row["completion_window"],
        metadata=_metadata(row["metadata"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        in_progress_at=row["in_progress_at"],
        finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"],
        failed_at=row["failed_at"],
        expired_at=row["expired_at"],
        cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"],
        errors=refusals.batch_errors(row["errors"]),
        counts=models.RequestCounts(
            total=row["total_requests"],
            pending=row["pending"],
            in_progress=row["in_progress"],
            completed=row["completed"],
            failed=row["failed"],
            canceled=row["canceled"],
        ),
        model=row["model"],
        usage=tuple(
            models.ModelUsage(model=model, requests=requests, unknown=unknown, usage=Usage(*tokens))
            for model, requests, unknown, *tokens in row["usage"] or ()
        ),
        budget=budgets.from_document(row["budget"]),
        budget_exceeded_at=row["budget_exceeded_at"],
    )


def request_from_row(row: asyncpg.Record) -> models.Request:
    daemon_id = row["daemon_id"]
    return models.Request(
        id=ids.RequestId(plain_uuid(row["id"])),
        batch_id=ids.BatchId(plain_uuid(row["batch_id"])),
        template_id=ids.TemplateId(plain_uuid(row["template_id"])),
        owner=row["owner"],
        custom_id=row["custom_id"],
        model=row["model"],
        line_number=row["line_number"],
        state=states.RequestState(row["state"]),
        attempt=row["attempt"],
        not_before=row["not_before"],
        daemon_id=None if daemon_id is None else ids.DaemonId(plain_uuid(daemon_id)),
        claimed_at=row["claimed_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        response_status=row["response_status"],
        response_body=row["response_body"],
        error_code=row["error_code"],
        error_message=row["error_message"],
    )


def template_from_row(row: asyncpg.Record) -> models.RequestTemplate:
    return models.RequestTemplate(
        id=ids.TemplateId(plain_uuid(row["id"])),
        file_id=ids.FileId(plain_uuid(row["file_id"])),
        line_number=row["line_number"],
        custom_id=row["custom_id"],
        method=row["method"],
        url=row["url"],
        model=row["model"],
        body=row["body"],
    )


def claimed_from_rows(
    found: list[asyncpg.Record], *, daemon_id: ids.DaemonId, claimed_at: datetime
) -> models.Claimed:
    """The claimed requests of rows (id, batch_id, owner, custom_id, model, method, url, body, attempt, deadline,
    and the `bucket_tokens` of the bucket rows, NULL here),
    all claimed by `daemon_id` at `claimed_at` (the claim sets both, so they are not read back)."""
    # The daemons' hot path: positional unpacking, and each distinct batch id converted once (a claim usually
    # takes many requests of few batches).
    batch_ids: dict[Any, ids.BatchId] = {}
    claimed = models.Claimed()
    for request_id, batch_id, owner, custom_id, model, method, url, body, attempt, deadline, _ in found:
        plain_batch_id = batch_ids.get(batch_id)
        if plain_batch_id is None:
            plain_batch_id = batch_ids[batch_id] = ids.BatchId(plain_uuid(batch_id))
        claimed.append(
            models.ClaimedRequest(
                id=ids.RequestId(plain_uuid(request_id)),
                batch_id=plain_batch_id,
                owner=owner,
                custom_id=custom_id,
                model=model,
                method=method,
                url=url,
                body=body,
                attempt=attempt,
                deadline=deadline,
                daemon_id=daemon_id,
                claimed_at=claimed_at,
            )
        )
    return claimed


def daemon_from_row(row: asyncpg.Record) -> models.DaemonRecord:
    return models.DaemonRecord(
        id=ids.DaemonId(plain_uuid(row["id"])),
        hostname=row["hostname"],
        pid=row["pid"],
        version=row["version"],
        status=states.DaemonStatus(row["status"]),
        started_at=row["started_at"],
        last_heartbeat=row["last_heartbeat"],
        stopped_at=row["stopped_at"],
        in_flight=row["in_flight"],
        limits=row["limits"] or {},
    )


def owner_parameter(owner: models.OwnerScope) -> str | None:
    """The `$owner` parameter of scoped queries: None stands for every owner (`owner_matches`)."""
    return None if owner is models.ALL_OWNERS else str(owner)


def state_predicate(allowed: Collection[states.RequestState], *, alias: str = "r") -> str:
    """The condition on a request row (of table alias `alias`; "" for none) that holds when its state is one of
    `allowed` (a set of the transition table, `domain.transitions`). Storage keeps claimed and processing as one
    state, `in_flight`, told apart by `started_at` (`STATE_EXPRESSION`): claimed is `state = 'in_flight' AND
    started_at IS NULL`, processing the same with `IS NOT NULL`, both together `state = 'in_flight'`; the other
    states are stored under their own names."""
    prefix = f"{alias}." if alias else ""
    terms = []
    stored = [f"'{state.value}'" for state in states.RequestState if state in allowed and not state.is_in_flight]
    if stored:
        column = f"{prefix}state"
        terms.append(f"{column} = {stored[0]}" if len(stored) == 1 else f"{column} IN ({', '.join(stored)})")
    in_flight = states.IN_FLIGHT_STATES.intersection(allowed)
    if in_flight == states.IN_FLIGHT_STATES:
        terms.append(f"{prefix}state = 'in_flight'")
    elif in_flight:
        started = "IS NULL" if states.RequestState.CLAIMED in in_flight else "IS NOT NULL"
        terms.append(f"{prefix}state = 'in_flight' AND {prefix}started_at {started}")
    if not terms:
        return "FALSE"
    if len(terms) == 1:
        return terms[0]
    return "(" + " OR ".join(f"({term})" for term in terms) + ")"


CANCEL_ON_RETURN = " OR ".join(f"b.{mark} IS NOT NULL" for mark in transitions.CANCEL_ON_RETURN_MARKS)
"""The condition on batch `b` under which a request handed back to the queue ends canceled instead
(`transitions.CANCEL_ON_RETURN_MARKS`): its batch is being cancelled or was deleted."""
