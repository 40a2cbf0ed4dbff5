"""A small versioned migration runner shared by both backends.

Migrations are the files `NNNN_name.sql` of a backend's `migrations/` folder, applied in version order, each in
its own transaction together with its row in `schema_migrations`. The backend supplies a lock that makes two
processes starting at once take turns (PostgreSQL: an advisory lock; SQLite: an exclusive transaction), so the
second finds the work done.

A database function that the code calls (PostgreSQL's claim) is not copied into a migration at each change: it
lives in one file, `functions/<name>.sql`, whose header says its version (`-- version: N`). After the migrations,
under the same lock, the runner installs each function whose recorded version is older than its file's, or that
was never recorded, and leaves a newer one alone: a release running `migrate` beside a newer release does not put
its older function back.
"""

from __future__ import annotations

import re
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_FUNCTION_NAME = re.compile(r"^([a-z][a-z0-9_]*)\.sql$")
_FUNCTION_VERSION = re.compile(r"^--\s*version:\s*(\d+)\s*$", re.MULTILINE)
_COMMENT = re.compile(r"--[^\n]*")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def has_code(self) -> bool:
        """False for a migration of comments alone (one whose content moved elsewhere): it is only recorded."""
        return bool(_COMMENT.sub("", self.sql).strip())


@dataclass(frozen=True, slots=True)
class DatabaseFunction:
    """A function defined by one file, `<name>.sql`, that replaces it (`CREATE OR REPLACE FUNCTION <name>`)."""

    name: str
    version: int
    """From the file's header comment (`-- version: N`); raised with every change of the function."""
    sql: str


def load_migrations(package: str) -> list[Migration]:
    """The migrations shipped in `package` (e.g. `fusillade.storage.sqlite.migrations`), sorted."""
    found: list[Migration] = []
    for entry in resources.files(package).iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), entry.name.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"Two migrations in {package} share a version number: {versions}.")
    return found


def load_functions(package: str) -> list[DatabaseFunction]:
    """The database functions shipped in `package` (e.g. `fusillade.storage.postgres.functions`), by name."""
    found: list[DatabaseFunction] = []
    for entry in resources.files(package).iterdir():
        match = _FUNCTION_NAME.match(entry.name)
        if match is None:
            continue
        sql = entry.read_text("utf-8")
        version = _FUNCTION_VERSION.search(_leading_comments(sql))
        if version is None:
            raise RuntimeError(f"{package}/{entry.name} does not say its version (a header line `-- version: N`).")
        found.append(DatabaseFunction(match.group(1), int(version.group(1)), sql))
    found.sort(key=lambda function: function.name)
    return found


def _leading_comments(sql: str) -> str:
    """The comment lines that open `sql` (its header), up to the first line of code."""
    header: list[str] = []
    for line in sql.splitlines():
        if line.strip() and not line.lstrip().startswith("--"):
            break
        header.append(line.strip())
    return "\n".join(header)


class MigrationTarget(Protocol):
    def locked(self) -> AbstractAsyncContextManager[None]:
        """Hold the migration lock (only one process migrates at a time)."""
        ...

    async def applied_versions(self) -> set[int]:
        """Versions already applied (creating the bookkeeping table if needed)."""
        ...

    async def apply(self, migration: Migration) -> None:
        """Run the migration's SQL and record it, in one transaction."""
        ...


class FunctionTarget(MigrationTarget, Protocol):
    """A migration target that also holds database functions (PostgreSQL)."""

    async def installed_functions(self) -> dict[str, int]:
        """The recorded version of each installed function, by name (creating the bookkeeping table if needed)."""
        ...

    async def install(self, function: DatabaseFunction) -> None:
        """Run the function's SQL and record its version, in one transaction."""
        ...


async def run_migrations(target: MigrationTarget, migrations: list[Migration]) -> list[str]:
    """Apply what is missing, in order; returns the names applied (empty when up to date)."""
    async with target.locked():
        return await _apply_missing(target, migrations)


async def run_migrations_and_functions(
    target: FunctionTarget, migrations: list[Migration], functions: list[DatabaseFunction]
) -> tuple[list[str], list[DatabaseFunction]]:
    """Apply the missing migrations, then install the functions whose file is newer than the database's copy
    (or that the database lacks), all under one hold of the lock. Returns the names of the migrations applied
    and the functions installed."""
    async with target.locked():
        applied = await _apply_missing(target, migrations)
        installed_versions = await target.installed_functions()
        installed: list[DatabaseFunction] = []
        for function in functions:
            if installed_versions.get(function.name, 0) < function.version:
                await target.install(function)
                installed.append(function)
    return applied, installed


async def _apply_missing(target: MigrationTarget, migrations: list[Migration]) -> list[str]:
    applied: list[str] = []
    done = await target.applied_versions()
    for migration in migrations:
        if migration.version not in done:
            await target.apply(migration)
            applied.append(migration.name)
    return applied
