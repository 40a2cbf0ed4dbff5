"""Schema migrations and database functions on PostgreSQL: the `storage.migrate` runner with a session advisory
lock, so that several processes starting at once take turns and the later ones find the work done.

The migrations are `migrations/NNNN_name.sql`, recorded by version in `schema_migrations`. The functions the code
calls are `functions/<name>.sql`, one definition each, installed after the migrations when the database's
recorded version (`schema_functions`) is older than the file's, and never downgraded (see `storage.migrate`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fusillade import clock as clocks
from fusillade.storage import migrate
from fusillade.storage.postgres.connection import Connection

MIGRATIONS_PACKAGE = "fusillade.storage.postgres.migrations"
FUNCTIONS_PACKAGE = "fusillade.storage.postgres.functions"

MIGRATION_LOCK_KEY = 0x66757369_6C6C6164  # "fusillad" as a 64-bit advisory lock key

logger = logging.getLogger(__name__)

_CREATE_MIGRATIONS_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL
)
"""

_CREATE_FUNCTIONS_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_functions (
    name         text        PRIMARY KEY,
    version      integer     NOT NULL,
    installed_at timestamptz NOT NULL
)
"""

# A recorded function that was dropped since (by hand) counts as missing, so that it is installed again.
_SELECT_FUNCTION_VERSIONS = """
SELECT f.name, f.version
FROM schema_functions f
WHERE EXISTS (SELECT 1 FROM pg_proc p WHERE p.proname = f.name AND p.pronamespace = current_schema()::regnamespace)
"""

_RECORD_FUNCTION = """
INSERT INTO schema_functions (name, version, installed_at) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET version = excluded.version, installed_at = excluded.installed_at
"""


class MigrationTarget:
    """`storage.migrate.FunctionTarget` on one dedicated connection (the advisory lock is a session lock)."""

    def __init__(self, connection: Connection, clock: clocks.WallClock, *, timeout_s: float) -> None:
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
        await self._connection.execute(_CREATE_MIGRATIONS_BOOKKEEPING)
        found = await self._connection.fetch("SELECT version FROM schema_migrations")
        return {row["version"] for row in found}

    async def apply(self, migration: migrate.Migration) -> None:
        async with self._connection.transaction():
            if migration.has_code:  # asyncpg refuses a script of comments alone
                await self._connection.execute(migration.sql, timeout=self._timeout_s)
            await self._connection.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                self._clock.now(),
            )

    async def installed_functions(self) -> dict[str, int]:
        await self._connection.execute(_CREATE_FUNCTIONS_BOOKKEEPING)
        found = await self._connection.fetch(_SELECT_FUNCTION_VERSIONS)
        return {row["name"]: row["version"] for row in found}

    async def install(self, function: migrate.DatabaseFunction) -> None:
        async with self._connection.transaction():
            await self._connection.execute(function.sql, timeout=self._timeout_s)
            await self._connection.execute(_RECORD_FUNCTION, function.name, function.version, self._clock.now())


async def run(connection: Connection, clock: clocks.WallClock, *, timeout_s: float) -> list[str]:
    """Apply the pending migrations of the PostgreSQL backend, then install the functions that are newer than the
    database's; returns the names of the migrations applied (a function installed is logged, not returned: the
    names are migrations, which the CLI counts)."""
    target = MigrationTarget(connection, clock, timeout_s=timeout_s)
    applied, installed = await migrate.run_migrations_and_functions(
        target, migrate.load_migrations(MIGRATIONS_PACKAGE), migrate.load_functions(FUNCTIONS_PACKAGE)
    )
    for function in installed:
        logger.info("installed database function %s, version %d", function.name, function.version)
    return applied
