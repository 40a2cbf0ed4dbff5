"""`fusillade migrate`: create or upgrade the database schema."""

from __future__ import annotations

from fusillade.cli import common
from fusillade.composition import database
from fusillade.config import Config


def migrate(config: common.ConfigOption = None, database_url: common.DatabaseUrlOption = None) -> None:
    """Create or upgrade the database schema.

    Safe to run from several processes at once: the migrations run under a lock.
    """
    settings = common.load(config, FUSILLADE_DATABASE_URL=("--database-url", database_url))
    applied = common.execute(_migrate(settings))
    if applied:
        common.stdout.print(f"applied {len(applied)} migration(s): {', '.join(applied)}", highlight=False)
    else:
        common.stdout.print("the database schema is up to date", highlight=False)


async def _migrate(config: Config) -> list[str]:
    storage = await database.open_storage(config, migrate=False)
    try:
        return await storage.migrate()
    finally:
        await storage.close()
