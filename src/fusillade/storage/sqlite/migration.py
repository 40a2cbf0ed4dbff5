"""The SQLite side of the shared migration runner.

The lock is one `BEGIN IMMEDIATE` transaction held for the whole run: a second process starting at once waits
for it (busy timeout), then finds the work done. Each migration runs in a savepoint with its bookkeeping row,
so it applies entirely or not at all. Statements are executed one by one (never `executescript`, which would
commit the open transaction).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime

from fusillade.storage import migrate
from fusillade.storage.sqlite import connection as connections

MIGRATIONS_PACKAGE = "fusillade.storage.sqlite.migrations"

CREATE_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at INTEGER NOT NULL
)
"""
SELECT_VERSIONS = "SELECT version FROM schema_migrations"
INSERT_VERSION = "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)"


def split_statements(script: str) -> list[str]:
    """The statements of an SQL script, split on the semicolons that end a statement (not those inside
    strings, comments or trigger bodies)."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if _has_code(pending):
                statements.append(pending.strip())
            pending = ""
    if _has_code(pending.removesuffix(";")):
        raise ValueError("The SQL script ends with an incomplete statement.")
    return statements


def _has_code(text: str) -> bool:
    lines = (line.split("--", 1)[0] for line in text.splitlines())
    return any(line.strip(" \t;") for line in lines)


def _applied_versions(connection: sqlite3.Connection, now: datetime) -> set[int]:
    connection.execute(CREATE_BOOKKEEPING)
    return {row[0] for row in connection.execute(SELECT_VERSIONS)}


def _apply(connection: sqlite3.Connection, now: datetime, migration: migrate.Migration) -> None:
    connection.execute("SAVEPOINT migration")
    try:
        for statement in split_statements(migration.sql):
            connection.execute(statement)
        connection.execute(INSERT_VERSION, (migration.version, migration.name, connections.to_micros(now)))
    except BaseException:
        connection.execute("ROLLBACK TO migration")
        connection.execute("RELEASE migration")
        raise
    connection.execute("RELEASE migration")


class SqliteMigrationTarget:
    """`migrate.MigrationTarget` for one SQLite database."""

    def __init__(self, database: connections.Database) -> None:
        self._database = database
        self._transaction: connections.WriteTransaction | None = None

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        async with self._database.write_transaction() as transaction:
            self._transaction = transaction
            try:
                yield
            finally:
                self._transaction = None

    def _current(self) -> connections.WriteTransaction:
        if self._transaction is None:
            raise RuntimeError("Migrations run only while the migration lock is held.")
        return self._transaction

    async def applied_versions(self) -> set[int]:
        return await self._current().run(_applied_versions)

    async def apply(self, migration: migrate.Migration) -> None:
        await self._current().run(lambda connection, now: _apply(connection, now, migration))


async def run(database: connections.Database) -> list[str]:
    """Apply the pending migrations of the SQLite backend; returns their names."""
    target = SqliteMigrationTarget(database)
    return await migrate.run_migrations(target, migrate.load_migrations(MIGRATIONS_PACKAGE))
