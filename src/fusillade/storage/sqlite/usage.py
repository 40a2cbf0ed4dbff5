"""An owner's usage report on SQLite: the `batch_usage` sums (one row per batch, model, UTC day and daemon), summed
again per owner and model, and per day or batch. Read through the `(owner, day)` index for one owner; a day is
stored as days since 1970-01-01."""

from __future__ import annotations

import sqlite3
from datetime import date, timedelta
from typing import Any, Final

from fusillade.domain import ids, models
from fusillade.domain.usage import Usage
from fusillade.domain.usage_report import EPOCH_DAY, UsageGrouping, UsageRow, day_number
from fusillade.storage.sqlite import connection as connections

_SUMS: Final = (
    "sum(requests), sum(unknown), sum(input_tokens), sum(cached_tokens), sum(output_tokens), sum(reasoning_tokens)"
)
# (the group's key column, its ORDER BY): a batch comes at the first day it has usage on, so a report reads in time
_KEYS: Final = {
    UsageGrouping.MODEL: ("NULL", "owner, model"),
    UsageGrouping.DAY: ("day", "owner, day, model"),
    UsageGrouping.BATCH: ("batch_id", "owner, min(min(day)) OVER (PARTITION BY owner, batch_id), batch_id, model"),
}


def usage_report(
    connection: sqlite3.Connection, *, owner: models.OwnerScope, since: date | None, by: UsageGrouping
) -> list[UsageRow]:
    conditions: list[str] = []
    parameters: list[Any] = []
    if owner is not models.ALL_OWNERS:
        conditions.append("owner = ?")
        parameters.append(owner)
    if since is not None:
        conditions.append("day >= ?")
        parameters.append(day_number(since))
    key, order = _KEYS[by]
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    grouped = "owner, model" if by is UsageGrouping.MODEL else f"owner, {key}, model"
    sql = f"SELECT owner, {key}, model, {_SUMS} FROM batch_usage {where} GROUP BY {grouped} ORDER BY {order}"
    return [_row(found, by) for found in connection.execute(sql, parameters)]


def _row(found: sqlite3.Row | tuple[Any, ...], by: UsageGrouping) -> UsageRow:
    owner, key, model, requests, unknown, *tokens = found
    return UsageRow(
        owner=owner,
        model=model,
        day=EPOCH_DAY + timedelta(days=key) if by is UsageGrouping.DAY else None,
        batch_id=ids.BatchId(connections.to_uuid(key)) if by is UsageGrouping.BATCH else None,
        requests=requests,
        unknown=unknown,
        usage=Usage(*tokens),
    )
