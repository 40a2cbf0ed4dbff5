"""Schema migrations on PostgreSQL: the `storage.migrate` runner with a session advisory lock, so that several
processes starting at once take turns and the later ones find the work done."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fusillade import clock as clocks
from fusillade.storage import migrate
from fusillade.storage.postgres.connection import Connection

MIGRATIONS_PACKAGE = "fusillade.storage.postgres.migrations"

MIGRATION_LOCK_KEY = 0x66757369_6C6C6164  # "fusillad" as a 64-bit advisory lock key

_CREATE_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL
)
"""


class MigrationTarget:
    """`storage.migrate.MigrationTarget` on one dedicated connection (the advisory lock is a session lock)."""

    def __init__(self, connection: Connection, clock: clocks.Clock, *, timeout_s: float) -> None:
        self._connection = connection
        self._clock = clock
        self._timeout_s = timeout_s

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        await self._connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY, timeout=self._timeout_s)
        try:
            yield
        finally:
            await self._connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)

    async def applied_versions(self) -> set[int]:
        await self._connection.execute(_CREATE_BOOKKEEPING)
        found = await self._connection.fetch("SELECT version FROM schema_migrations")
        return {row["version"] for row in found}

    async def apply(self, migration: migrate.Migration) -> None:
        async with self._connection.transaction():
            await self._connection.execute(migration.sql, timeout=self._timeout_s)
            await self._connection.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                self._clock.now(),
            )
