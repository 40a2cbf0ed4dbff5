"""An owner's usage report on PostgreSQL: the `batch_usage` sums (one row per batch, model, UTC day and daemon),
summed again per owner and model, and per day or batch. Read through the `(owner, day)` index for one owner."""

from __future__ import annotations

from datetime import date
from typing import Any, Final

from fusillade.domain import ids, models
from fusillade.domain.usage import Usage
from fusillade.domain.usage_report import UsageGrouping, UsageRow
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

_SUMS: Final = """
    sum(requests)::bigint, sum(unknown)::bigint, sum(input_tokens)::bigint, sum(cached_tokens)::bigint,
    sum(output_tokens)::bigint, sum(reasoning_tokens)::bigint
"""
# (the group's key column, its ORDER BY): a batch comes at the first day it has usage on, so a report reads in time
_KEYS: Final = {
    UsageGrouping.MODEL: ("NULL::text", "owner, model"),
    UsageGrouping.DAY: ("day", "owner, day, model"),
    UsageGrouping.BATCH: ("batch_id", "owner, min(min(day)) OVER (PARTITION BY owner, batch_id), batch_id, model"),
}


async def usage_report(
    connection: Connection, *, owner: models.OwnerScope, since: date | None, by: UsageGrouping
) -> list[UsageRow]:
    conditions: list[str] = []
    parameters: list[Any] = []
    scope = rows.owner_parameter(owner)
    if scope is not None:
        parameters.append(scope)
        conditions.append(f"owner = ${len(parameters)}")
    if since is not None:
        parameters.append(since)
        conditions.append(f"day >= ${len(parameters)}")
    key, order = _KEYS[by]
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    grouped = "owner, model" if by is UsageGrouping.MODEL else f"owner, {key}, model"
    sql = (
        f"SELECT owner, {key} AS key, model, {_SUMS} FROM batch_usage {where} GROUP BY {grouped} ORDER BY {order}"
    )
    return [_row(found, by) for found in await connection.fetch(sql, *parameters)]


def _row(found: Any, by: UsageGrouping) -> UsageRow:
    owner, key, model, requests, unknown, *tokens = found
    return UsageRow(
        owner=owner,
        model=model,
        day=key if by is UsageGrouping.DAY else None,
        batch_id=ids.BatchId(rows.plain_uuid(key)) if by is UsageGrouping.BATCH else None,
        requests=requests,
        unknown=unknown,
        usage=Usage(*tokens),
    )
