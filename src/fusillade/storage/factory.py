"""Open a storage backend from a database URL. Only composition code (the app, the CLI, tests, benchmarks)
calls this; everything else receives a `storage.base.Storage`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fusillade import errors
from fusillade.clock import Clock
from fusillade.storage import base

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
DEFAULT_DATABASE_TIMEOUT = base.DEFAULT_DATABASE_TIMEOUT


def sqlite_path(url: str) -> Path:
    """`sqlite:///./fusillade.db` -> `./fusillade.db`; `sqlite:////var/lib/f.db` -> `/var/lib/f.db`."""
    path = url.removeprefix(SQLITE_PREFIX)
    if not path:
        raise errors.ConfigurationError(
            f"The database URL {url!r} names no file; write it as sqlite:///./fusillade.db "
            "(relative) or sqlite:////absolute/path.db."
        )
    return Path(path)


async def open_storage(
    url: str,
    *,
    clock: Clock | None = None,
    migrate: bool = True,
    database_timeout: timedelta = DEFAULT_DATABASE_TIMEOUT,
    write_priority: base.WritePriority = base.WritePriority.NORMAL,
) -> base.Storage:
    """Open (and by default migrate) the database at `url`: `sqlite:///PATH` or `postgresql://…`.
    `database_timeout` (PostgreSQL): a database that does not answer within it, even one silent after a network
    cut, fails the call with `StorageUnavailable` (see `PostgresStorage.connect`). `write_priority` (SQLite):
    how this process's writes take turns with other processes' (`base.WritePriority`)."""
    store: base.Storage
    if url.startswith(SQLITE_PREFIX):
        from fusillade.storage.sqlite.store import SqliteStorage

        store = await SqliteStorage.open(sqlite_path(url), clock=clock, write_priority=write_priority)
    elif url.startswith(POSTGRES_PREFIXES):
        from fusillade.storage.postgres.store import PostgresStorage

        store = await PostgresStorage.connect(url, clock=clock, command_timeout_s=database_timeout.total_seconds())
    else:
        raise errors.ConfigurationError(
            f"Unsupported database URL {url!r}: use sqlite:///PATH (the default is sqlite:///./fusillade.db) "
            "or postgresql://USER@HOST:PORT/DATABASE."
        )
    if migrate:
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
    return store
