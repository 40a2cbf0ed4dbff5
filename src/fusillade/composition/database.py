"""The configuration's database, opened with the configuration's settings: the one way a command opens
storage, so that every command honours `database_url` and `database_timeout` alike."""

from __future__ import annotations

from fusillade.config import Config
from fusillade.storage.base import Storage, WritePriority
from fusillade.storage.factory import open_storage as open_url


async def open_storage(
    config: Config,
    *,
    database_url: str | None = None,
    write_priority: WritePriority = WritePriority.NORMAL,
    migrate: bool = True,
) -> Storage:
    """Open (and by default migrate) the configuration's database, or `database_url` instead (the state
    database of `fusillade run`), with its `database_timeout`. `write_priority`: how this process's writes take
    turns with other processes' on a SQLite file (the daemon HIGH, the API LOW, a one-shot command NORMAL)."""
    return await open_url(
        database_url or config.database_url,
        database_timeout=config.database_timeout,
        write_priority=write_priority,
        migrate=migrate,
    )
