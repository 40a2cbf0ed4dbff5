"""API keys on SQLite: stored by the hex SHA-256 of the key (never the key), found by hash on every request."""

from __future__ import annotations

import re
import sqlite3
from datetime import datetime
from typing import Final, NamedTuple

from fusillade import errors
from fusillade.domain import ids, models
from fusillade.storage import refusals
from fusillade.storage.sqlite import connection as connections

KEY_HASH: Final = re.compile(r"[0-9a-f]{64}")
"""A hex SHA-256. Checked before storing, so that a caller passing the key itself never gets it stored."""


class ApiKeyRow(NamedTuple):
    id: bytes
    owner: str
    name: str
    prefix: str
    admin: int
    created_at: int
    revoked_at: int | None


API_KEY_COLUMNS: Final = ", ".join(ApiKeyRow._fields)

# ON CONFLICT on the hash only: a duplicate hash is the caller's error, any other constraint a storage error.
INSERT_API_KEY = """
INSERT INTO api_keys (id, owner, name, key_hash, prefix, admin, created_at, revoked_at)
VALUES (?, ?, ?, ?, ?, ?, ?, NULL)
ON CONFLICT (key_hash) DO NOTHING
"""
FIND_API_KEY = f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL"
LIST_API_KEYS = f"SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
LIST_OWNER_API_KEYS = f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE owner = ? ORDER BY created_at, id"
SELECT_API_KEY = f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?"
# COALESCE keeps the first revocation time: revoking twice changes nothing.
REVOKE_API_KEY = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"


def api_key_from_row(row: ApiKeyRow) -> models.ApiKey:
    return models.ApiKey(
        id=ids.ApiKeyId(connections.to_uuid(row.id)),
        owner=row.owner,
        name=row.name,
        prefix=row.prefix,
        admin=bool(row.admin),
        created_at=connections.from_micros(row.created_at),
        revoked_at=connections.from_micros_or_none(row.revoked_at),
    )


def create_api_key(
    connection: sqlite3.Connection,
    now: datetime,
    *,
    owner: str,
    name: str,
    key_hash: str,
    prefix: str,
    admin: bool,
) -> models.ApiKey:
    if KEY_HASH.fullmatch(key_hash) is None:
        raise errors.ValidationError("An API key is stored by its hex SHA-256 (64 lowercase hex digits) only.")
    key_id = ids.new_api_key_id()
    inserted = connection.execute(
        INSERT_API_KEY, (key_id.bytes, owner, name, key_hash, prefix, int(admin), connections.to_micros(now))
    )
    if inserted.rowcount == 0:
        raise errors.ValidationError("An API key with this hash already exists.")
    return models.ApiKey(id=key_id, owner=owner, name=name, prefix=prefix, admin=admin, created_at=now)


def find_api_key(connection: sqlite3.Connection, key_hash: str) -> models.ApiKey | None:
    found = connection.execute(FIND_API_KEY, (key_hash,)).fetchone()
    return None if found is None else api_key_from_row(ApiKeyRow._make(found))


def list_api_keys(connection: sqlite3.Connection, *, owner: models.OwnerScope) -> list[models.ApiKey]:
    if owner is models.ALL_OWNERS:
        found = connection.execute(LIST_API_KEYS)
    else:
        found = connection.execute(LIST_OWNER_API_KEYS, (owner,))
    return [api_key_from_row(ApiKeyRow._make(row)) for row in found]


def revoke_api_key(connection: sqlite3.Connection, now: datetime, key_id: ids.ApiKeyId) -> models.ApiKey:
    revoked = connection.execute(REVOKE_API_KEY, (connections.to_micros(now), key_id.bytes))
    if revoked.rowcount == 0:
        raise refusals.no_api_key(key_id)
    return api_key_from_row(ApiKeyRow._make(connection.execute(SELECT_API_KEY, (key_id.bytes,)).fetchone()))
