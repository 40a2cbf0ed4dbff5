"""API keys on PostgreSQL: stored by the hex SHA-256 of the key (never the key), found by hash on every request."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final

import asyncpg

from fusillade import errors
from fusillade.domain import ids, models
from fusillade.storage import refusals
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

KEY_HASH: Final = re.compile(r"[0-9a-f]{64}")
"""A hex SHA-256. Checked before storing, so that a caller passing the key itself never gets it stored."""

API_KEY_COLUMNS: Final = "k.id, k.owner, k.name, k.prefix, k.admin, k.created_at, k.revoked_at"

# ON CONFLICT on the hash only: a duplicate hash is the caller's error (no row comes back), any other
# constraint a storage error.
_INSERT = f"""
INSERT INTO api_keys AS k (id, owner, name, key_hash, prefix, admin, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (key_hash) DO NOTHING
RETURNING {API_KEY_COLUMNS}
"""

_FIND = f"SELECT {API_KEY_COLUMNS} FROM api_keys k WHERE k.key_hash = $1 AND k.revoked_at IS NULL"

_LIST = f"""
SELECT {API_KEY_COLUMNS} FROM api_keys k
WHERE ($1::text IS NULL OR k.owner = $1)
ORDER BY k.created_at, k.id
"""

# COALESCE keeps the first revocation time: revoking twice changes nothing.
_REVOKE = f"""
UPDATE api_keys AS k SET revoked_at = COALESCE(k.revoked_at, $2)
WHERE k.id = $1
RETURNING {API_KEY_COLUMNS}
"""


def api_key_from_row(row: asyncpg.Record) -> models.ApiKey:
    return models.ApiKey(
        id=ids.ApiKeyId(rows.plain_uuid(row["id"])),
        owner=row["owner"],
        name=row["name"],
        prefix=row["prefix"],
        admin=row["admin"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


async def create_api_key(
    connection: Connection, *, owner: str, name: str, key_hash: str, prefix: str, admin: bool, now: datetime
) -> models.ApiKey:
    if KEY_HASH.fullmatch(key_hash) is None:
        raise errors.ValidationError("An API key is stored by its hex SHA-256 (64 lowercase hex digits) only.")
    row = await connection.fetchrow(_INSERT, ids.new_api_key_id(), owner, name, key_hash, prefix, admin, now)
    if row is None:
        raise errors.ValidationError("An API key with this hash already exists.")
    return api_key_from_row(row)


async def find_api_key(connection: Connection, key_hash: str) -> models.ApiKey | None:
    row = await connection.fetchrow(_FIND, key_hash)
    return None if row is None else api_key_from_row(row)


async def list_api_keys(connection: Connection, *, owner: models.OwnerScope) -> list[models.ApiKey]:
    return [api_key_from_row(row) for row in await connection.fetch(_LIST, rows.owner_parameter(owner))]


async def revoke_api_key(connection: Connection, key_id: ids.ApiKeyId, now: datetime) -> models.ApiKey:
    row = await connection.fetchrow(_REVOKE, key_id, now)
    if row is None:
        raise refusals.no_api_key(key_id)
    return api_key_from_row(row)
