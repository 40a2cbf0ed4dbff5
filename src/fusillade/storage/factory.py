"""Open a storage backend from a database URL: the one place that picks a backend, and the only module outside
the backends that imports them (lazily: a driver is loaded only when its database is opened).

Within fusillade only the composition root (`fusillade.composition`) calls it; library users call it too (it is
`fusillade.open_storage`), as do tests and benchmarks. Everything else receives a `storage.base.Storage`."""

from __future__ import annotations

from datetime import timedelta

from fusillade import errors
from fusillade.clock import WallClock
from fusillade.storage import base, urls

DEFAULT_DATABASE_TIMEOUT = base.DEFAULT_DATABASE_TIMEOUT


async def open_storage(
    url: str,
    *,
    clock: WallClock | None = None,
    migrate: bool = True,
    database_timeout: timedelta = DEFAULT_DATABASE_TIMEOUT,
    write_priority: base.WritePriority = base.WritePriority.NORMAL,
) -> base.Storage:
    """Open (and by default migrate) the database at `url`: `sqlite:///PATH` or `postgresql://…`.
    `database_timeout` (PostgreSQL): a database that does not answer within it, even one silent after a network
    cut, fails the call with `StorageUnavailable` (see `PostgresStorage.connect`). `write_priority` (SQLite):
    how this process's writes take turns with other processes' (`base.WritePriority`)."""
    store: base.Storage
    if urls.is_sqlite(url):
        from fusillade.storage.sqlite.store import SqliteStorage

        store = await SqliteStorage.open(urls.sqlite_path(url), clock=clock, write_priority=write_priority)
    elif urls.is_postgres(url):
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
