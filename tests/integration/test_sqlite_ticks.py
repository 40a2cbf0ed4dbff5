"""SQLite: a daemon's tick runs on the event loop's own connection when it can start at once, and waits for
another process's write lock in the writer thread, never on the loop."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from fusillade.domain import models
from fusillade.storage.sqlite.store import SqliteStorage
from tests.support import factories


def _capacity(free: int) -> list[models.ModelCapacity]:
    return [models.ModelCapacity(model=factories.MODEL, free=free)]


def _size(path: Path) -> int:
    return path.stat().st_size


async def test_a_tick_waits_for_another_writer_without_blocking_the_loop(
    path: Path, sqlite_storage: SqliteStorage
) -> None:
    await factories.create_batch(sqlite_storage, count=3)
    daemon = await factories.register(sqlite_storage)
    [first] = (await sqlite_storage.apply_writes_and_claim(daemon, [], _capacity(1), limit=1))[1]

    other = sqlite3.connect(path, isolation_level=None)  # another process's writer, holding the lock
    try:
        other.execute("BEGIN IMMEDIATE")
        tick = asyncio.create_task(
            sqlite_storage.apply_writes_and_claim(
                daemon, [models.Complete(first.id, 200, "{}")], _capacity(2), limit=2
            )
        )
        turns = 0
        for _ in range(20):  # the loop keeps turning while the tick waits for the lock
            await asyncio.sleep(0.01)
            turns += 1
        assert turns == 20 and not tick.done()
        other.execute("COMMIT")
    finally:
        other.close()
    report, claimed = await asyncio.wait_for(tick, timeout=10)
    assert report.applied == {first.id}
    assert sorted(request.custom_id for request in claimed) == ["req-2", "req-3"]


async def test_maintenance_checkpoints_what_the_ticks_wrote(path: Path, sqlite_storage: SqliteStorage) -> None:
    await factories.create_batch(sqlite_storage, count=50)
    daemon = await factories.register(sqlite_storage)
    _, claimed = await sqlite_storage.apply_writes_and_claim(daemon, [], _capacity(50), limit=50)
    writes = [models.Complete(item.id, 200, "{}") for item in claimed]
    await sqlite_storage.apply_writes_and_claim(daemon, writes, [], limit=0)
    # Far below the automatic checkpoint's 1,000 pages: the pages are still only in the WAL...
    before = _size(path)
    await sqlite_storage.maintain_queue()
    # ... until the maintenance checkpoint copies them into the database file.
    assert _size(path) > before
