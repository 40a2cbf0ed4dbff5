"""Integration tier: the daemon on a real database (each test once per backend, fresh database) against the
mock upstream on a real socket, through the real aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from pathlib import Path

import pytest

from fusillade.daemon import Daemon, DaemonSettings
from fusillade.domain import models
from fusillade.domain.retry import RetryPolicy
from fusillade.mock_upstream import MockUpstream
from fusillade.storage import base
from fusillade.storage.sqlite.store import SqliteStorage
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route

FAST_RETRIES = RetryPolicy(
    base_delay=timedelta(milliseconds=20), max_delay=timedelta(milliseconds=200), max_attempts=6
)


def fast_settings(**changes: object) -> DaemonSettings:
    """Settings for tests: short ticks so that everything happens within a second or two."""
    values: dict[str, object] = {
        "idle_poll_interval": timedelta(milliseconds=100),
        "heartbeat_interval": timedelta(milliseconds=200),
        "stale_after": timedelta(seconds=2),
        "maintenance_interval": timedelta(milliseconds=100),
        "cancellation_poll_interval": timedelta(milliseconds=100),
        "shutdown_grace": timedelta(seconds=2),
        "retry": FAST_RETRIES,
        "rate_limit_pause": timedelta(milliseconds=100),
        "database_backoff_max": timedelta(milliseconds=500),
    }
    values.update(changes)
    return DaemonSettings(**values)  # type: ignore[arg-type]


def routes_for(
    upstream: MockUpstream, limits: Mapping[str, int], *, stream: bool = False, **route_options: object
) -> dict[str, Route]:
    return {
        model: Route(base_url=upstream.url, concurrency=limit, stream=stream, **route_options)  # type: ignore[arg-type]
        for model, limit in limits.items()
    }


@contextlib.asynccontextmanager
async def running(
    storage: base.Storage,
    client: UpstreamClient,
    routes: Mapping[str, Route],
    settings: DaemonSettings | None = None,
    *,
    default_route: Route | None = None,
) -> AsyncIterator[Daemon]:
    """A daemon running in the background; stopped in order (and its failure raised) on exit."""
    daemon = Daemon(storage, client, routes, default_route=default_route, settings=settings or fast_settings())
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        daemon.stop()
        async with asyncio.timeout(20):
            await task


async def batch_status(storage: base.Storage, batch: models.Batch) -> models.Batch:
    return await storage.get_batch(batch.id, owner=models.ALL_OWNERS)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """An SQLite database file of this test (for the SQLite-only tests)."""
    return tmp_path / "fusillade.db"


@pytest.fixture
async def sqlite_storage(path: Path) -> AsyncIterator[SqliteStorage]:
    """The SQLite store on `path`, migrated."""
    store = await SqliteStorage.open(path)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()
