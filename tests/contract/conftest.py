"""Fixtures of the storage contract suite: every test runs once per backend (ids `sqlite` and `postgres`), each
on a fresh, migrated database, with a `ManualClock` that only moves when the test says so."""

from __future__ import annotations

import pytest

from fusillade import clock as clocks
from fusillade.storage import base
from tests.support import backends

# `backend` (a fresh database per test, once per backend kind) comes from tests/conftest.py.


@pytest.fixture
def clock() -> clocks.ManualClock:
    return clocks.ManualClock()


@pytest.fixture
async def storage(backend: backends.Backend, clock: clocks.ManualClock) -> base.Storage:
    """A store on the test's database, migrated, reading time from `clock`."""
    store: base.Storage = await backend.open_store(clock)
    if not backend.is_postgres:
        await store.migrate()
    return store
