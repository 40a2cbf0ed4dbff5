"""Storage lifecycle: migrations (idempotent, concurrent), ping, close; driver errors surface as StorageError."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, models
from fusillade.storage import base
from tests.support import backends, factories, postgres


async def test_migrate_on_a_migrated_database_does_nothing(storage: base.Storage) -> None:
    assert await storage.migrate() == []
    assert await storage.migrate() == []


async def test_migrate_a_fresh_database(backend: backends.Backend, clock: clocks.ManualClock) -> None:
    location = await backend.blank_location()
    store = await backend.open_store(clock, location=location)
    applied = await store.migrate()
    assert applied != []
    assert all(isinstance(name, str) and name for name in applied)
    assert await store.migrate() == []
    file = await factories.upload(store)
    assert (await store.get_file(file.id, owner="alice")).request_count == 3


async def test_concurrent_migrations_take_turns(backend: backends.Backend, clock: clocks.ManualClock) -> None:
    location = await backend.blank_location()
    stores = [await backend.open_store(clock, location=location) for _ in range(3)]
    results = await asyncio.gather(*(store.migrate() for store in stores))
    applied = [result for result in results if result]
    assert len(applied) == 1, results
    assert await stores[0].migrate() == []
    batch = await factories.create_batch(stores[1])
    assert (await stores[2].get_batch(batch.id, owner="alice")).counts.total == 3


async def test_ping(storage: base.Storage) -> None:
    await storage.ping()


async def test_a_closed_store_raises_storage_errors(backend: backends.Backend, clock: clocks.ManualClock) -> None:
    store = await backend.open_store(clock, track=False)
    if not backend.is_postgres:
        await store.migrate()
    await store.ping()
    await store.close()
    with pytest.raises(errors.StorageError):
        await store.get_file(ids.new_file_id(), owner=models.ALL_OWNERS)
    with pytest.raises(errors.StorageError):
        await store.ping()


async def test_an_unreachable_database_raises_storage_errors(
    backend: backends.Backend, clock: clocks.ManualClock, tmp_path: Path
) -> None:
    failure: BaseException
    if backend.is_postgres:
        url = f"postgresql://postgres@127.0.0.1:{postgres.free_port()}/nothing"
        with pytest.raises(errors.StorageUnavailable) as unavailable:
            store = await backend.open_store(clock, location=url)
            await store.ping()
        failure = unavailable.value
    else:
        directory = tmp_path / "a-directory"
        directory.mkdir()
        with pytest.raises(errors.StorageError) as broken:
            store = await backend.open_store(clock, location=str(directory))
            await store.migrate()
        failure = broken.value
    assert failure.__cause__ is not None


async def test_a_corrupt_database_raises_storage_errors(
    backend: backends.Backend, clock: clocks.ManualClock, tmp_path: Path
) -> None:
    if backend.is_postgres:
        # A database that does not exist on a server that answers.
        location = postgres.with_database(backend.location, "fusillade_test_missing_" + ids.new_file_id().hex)
    else:
        corrupt = tmp_path / "corrupt.db"
        corrupt.write_bytes(b"this is not an SQLite database\n" * 256)
        location = str(corrupt)
    with pytest.raises(errors.StorageError) as caught:
        store = await backend.open_store(clock, location=location)
        await store.migrate()
    assert caught.value.__cause__ is not None
