"""A small versioned migration runner shared by both backends.

Migrations are the files `NNNN_name.sql` of a backend's `migrations/` folder, applied in version order, each in
its own transaction together with its row in `schema_migrations`. The backend supplies a lock that makes two
processes starting at once take turns (PostgreSQL: an advisory lock; SQLite: an exclusive transaction), so the
second finds the work done.
"""

from __future__ import annotations

import re
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
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


async def run_migrations(target: MigrationTarget, migrations: list[Migration]) -> list[str]:
    """Apply what is missing, in order; returns the names applied (empty when up to date)."""
    applied: list[str] = []
    async with target.locked():
        done = await target.applied_versions()
        for migration in migrations:
            if migration.version not in done:
                await target.apply(migration)
                applied.append(migration.name)
    return applied
