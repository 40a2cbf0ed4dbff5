"""Models seen per owner on SQLite: recorded by an upload (those going to the default route), listed per owner."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from fusillade.domain import models, served
from fusillade.storage.sqlite import connection as connections

# A model the owner already has keeps its first time.
INSERT_SEEN: Final = """
INSERT INTO models_seen (owner, model, first_seen_at) VALUES (?, ?, ?) ON CONFLICT (owner, model) DO NOTHING
"""
LIST_OWNER_SEEN: Final = """
SELECT model, first_seen_at FROM models_seen INDEXED BY models_seen_recent
WHERE owner = ? ORDER BY first_seen_at DESC, model LIMIT ?
"""
FIND_OWNER_SEEN: Final = "SELECT model, first_seen_at FROM models_seen WHERE owner = ? AND model = ?"
LIST_ALL_SEEN: Final = """
SELECT model, min(first_seen_at) AS first FROM models_seen GROUP BY model ORDER BY first DESC, model LIMIT ?
"""
FIND_ALL_SEEN: Final = "SELECT model, min(first_seen_at) FROM models_seen WHERE model = ? GROUP BY model"


def record_seen(connection: sqlite3.Connection, now: datetime, *, owner: str, found: Sequence[str]) -> None:
    at = connections.to_micros(now)
    connection.executemany(INSERT_SEEN, [(owner, model, at) for model in found])


def list_seen(
    connection: sqlite3.Connection, *, owner: models.OwnerScope, model: str | None, limit: int
) -> list[served.SeenModel]:
    if owner is models.ALL_OWNERS:
        rows = (
            connection.execute(LIST_ALL_SEEN, (limit,))
            if model is None
            else connection.execute(FIND_ALL_SEEN, (model,))
        )
    elif model is None:
        rows = connection.execute(LIST_OWNER_SEEN, (owner, limit))
    else:
        rows = connection.execute(FIND_OWNER_SEEN, (owner, model))
    return [served.SeenModel(model=str(name), first_seen_at=connections.from_micros(at)) for name, at in rows]
