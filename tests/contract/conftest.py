"""Fixtures of the storage contract suite: every test runs once per backend (ids `sqlite` and `postgres`), each
on a fresh, migrated database, with a `ManualClock` that only moves when the test says so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fusillade import clock as clocks
from fusillade.storage import base
from tests.support import backends


@pytest.fixture
def clock() -> clocks.ManualClock:
    return clocks.ManualClock()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[backends.Backend]:
    """The backend under test, on a fresh database (closed and dropped after the test)."""
    if request.param == "postgres":
        handle = backends.Backend(
            "postgres",
            tmp_path,
            server=request.getfixturevalue("postgres_server"),
            template=request.getfixturevalue("postgres_template"),
        )
    else:
        handle = backends.Backend("sqlite", tmp_path)
    await handle.setup()
    try:
        yield handle
    finally:
        await handle.aclose()


@pytest.fixture
async def storage(backend: backends.Backend, clock: clocks.ManualClock) -> base.Storage:
    """A store on the test's database, migrated, reading time from `clock`."""
    store: base.Storage = await backend.open_store(clock)
    if not backend.is_postgres:
        await store.migrate()
    return store
