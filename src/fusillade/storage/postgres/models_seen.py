"""Models seen per owner on PostgreSQL: recorded by an upload (those going to the default route), listed per
owner."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

from fusillade.domain import models, served
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

# One statement for the whole file; a model the owner already has keeps its first time.
_INSERT: Final = """
INSERT INTO models_seen (owner, model, first_seen_at)
SELECT $1, model, $3 FROM unnest($2::text[]) AS m(model)
ON CONFLICT (owner, model) DO NOTHING
"""
_LIST_OWNER: Final = """
SELECT model, first_seen_at FROM models_seen
WHERE owner = $1 ORDER BY first_seen_at DESC, model LIMIT $2
"""
_FIND_OWNER: Final = "SELECT model, first_seen_at FROM models_seen WHERE owner = $1 AND model = $2"
_LIST_ALL: Final = """
SELECT model, min(first_seen_at) AS first_seen_at FROM models_seen
GROUP BY model ORDER BY min(first_seen_at) DESC, model LIMIT $1
"""
_FIND_ALL: Final = """
SELECT model, min(first_seen_at) AS first_seen_at FROM models_seen WHERE model = $1 GROUP BY model
"""


async def record_seen(connection: Connection, *, owner: str, found: Sequence[str], now: datetime) -> None:
    await connection.execute(_INSERT, owner, list(found), now)


async def list_seen(
    connection: Connection, *, owner: models.OwnerScope, model: str | None, limit: int
) -> list[served.SeenModel]:
    scope = rows.owner_parameter(owner)
    if scope is None:
        found = await (connection.fetch(_LIST_ALL, limit) if model is None else connection.fetch(_FIND_ALL, model))
    elif model is None:
        found = await connection.fetch(_LIST_OWNER, scope, limit)
    else:
        found = await connection.fetch(_FIND_OWNER, scope, model)
    return [served.SeenModel(model=row["model"], first_seen_at=row["first_seen_at"]) for row in found]
