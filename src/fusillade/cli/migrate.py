"""`fusillade migrate`: create or upgrade the database schema."""

from __future__ import annotations

from fusillade.cli import common
from fusillade.storage import factory


def migrate(config: common.ConfigOption = None, database_url: common.DatabaseUrlOption = None) -> None:
    """Create or upgrade the database schema.

    Safe to run from several processes at once: the migrations run under a lock.
    """
    settings = common.load(config, FUSILLADE_DATABASE_URL=("--database-url", database_url))
    applied = common.execute(_migrate(settings.database_url))
    if applied:
        common.stdout.print(f"applied {len(applied)} migration(s): {', '.join(applied)}", highlight=False)
    else:
        common.stdout.print("the database schema is up to date", highlight=False)


async def _migrate(url: str) -> list[str]:
    storage = await factory.open_storage(url, migrate=False)
    try:
        return await storage.migrate()
    finally:
        await storage.close()
