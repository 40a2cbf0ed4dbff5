"""Integration tier: the daemon on a real database (each test once per backend, fresh database) against the
mock upstream on a real socket, through the real aiohttp client.

Tests of the daemon's timing run it on a `ManualClock` shared with its storage (`SimulatedTime`): time moves
only when the test moves it, and only once the daemon has done all it could at the current moment, so that no
decision depends on how fast or loaded this machine is."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fusillade import clock as clocks
from fusillade.daemon import Daemon, DaemonSettings
from fusillade.domain import models
from fusillade.domain.retry import RetryPolicy
from fusillade.mock_upstream import MockUpstream
from fusillade.storage import base
from fusillade.storage.sqlite.store import SqliteStorage
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from tests.support import backends

FAST_RETRIES = RetryPolicy(
    base_delay=timedelta(milliseconds=20), max_delay=timedelta(milliseconds=200), max_attempts=6
)


def fast_settings(**changes: object) -> DaemonSettings:
    """Settings for tests: short ticks so that everything happens within a second or two."""
    values: dict[str, object] = {
        "idle_poll_interval": timedelta(milliseconds=100),
        "heartbeat_interval": timedelta(milliseconds=200),
        "stale_after": timedelta(seconds=10),  # no test waits for it on the real clock (see test_daemon_time.py)
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
    """A daemon running in the background on the real clock; stopped in order (and its failure raised) on
    exit."""
    daemon = Daemon(storage, client, routes, default_route=default_route, settings=settings or fast_settings())
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        daemon.stop()
        async with asyncio.timeout(20):
            await task


# ------------------------------------------------------------------------------------------ simulated time

DAEMON_TIMERS = 6
"""With nothing to do at the current moment, each loop of a daemon waits on its clock: the tick loop (its idle
poll) and the five side loops (heartbeat, maintenance, queue upkeep, cancellation, purge)."""
QUIET_POLLS = 3
"""A daemon counts as settled once it looked settled this many polls in a row."""


def simulated_settings(**changes: object) -> DaemonSettings:
    """The default knobs (simulated time costs nothing, so the real intervals can be used), except: no
    gathering delays before a tick (they would wait on the clock), and retries without jitter."""
    values: dict[str, object] = {
        "min_tick_interval": timedelta(0),
        "commit_max_delay": timedelta(0),
        "retry": RetryPolicy(base_delay=timedelta(seconds=2), jitter=0.0, max_attempts=5),
        "shutdown_grace": timedelta(seconds=5),
    }
    values.update(changes)
    return DaemonSettings(**values)  # type: ignore[arg-type]


class SimulatedTime:
    """Moves a `ManualClock` for one daemon under test, and waits (in real time, bounded: a safety net only)
    for the daemon to settle after each move: every loop of it waits on the clock again, and every call it runs
    has reached the upstream (or ended)."""

    def __init__(self, clock: clocks.ManualClock, daemon: Daemon, upstream: MockUpstream) -> None:
        self.clock = clock
        self._daemon = daemon
        self._upstream = upstream

    @property
    def elapsed(self) -> float:
        """Seconds on the clock since it was made."""
        return self.clock.monotonic()

    def _looks_settled(self) -> bool:
        return (
            self.clock.sleepers >= DAEMON_TIMERS
            and self._daemon.in_flight == self._upstream.stats.in_flight
            and self._daemon.daemon_id is not None
        )

    async def settle(self, *, within: float = 10.0) -> None:
        """Wait until the daemon did all it could at the clock's current moment (it looked settled
        `QUIET_POLLS` polls in a row): a claim or a call still on its way may make it look settled a moment
        early, which only lets a timer act a step late, never early."""
        deadline = time.monotonic() + within
        quiet = 0
        while quiet < QUIET_POLLS:
            quiet = quiet + 1 if self._looks_settled() else 0
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"The daemon did not settle within {within} s (waits on the clock: {self.clock.sleepers}, "
                    f"calls: {self._daemon.in_flight}, at the upstream: {self._upstream.stats.in_flight})."
                )
            await asyncio.sleep(0.002)

    async def advance(self, delta: timedelta) -> None:
        """Move the clock on by `delta`, one wait's deadline at a time, letting the daemon settle after each."""
        remaining = delta
        while (wake := self.clock.next_wake()) is not None and wake <= remaining:
            await self.clock.run_for(wake)
            remaining -= wake
            await self.settle()
        await self.clock.run_for(remaining)
        await self.settle()

    async def advance_to(self, elapsed: float) -> None:
        """Move the clock on until `elapsed` seconds since its start."""
        await self.advance(
            max(timedelta(0), timedelta(seconds=elapsed) - timedelta(seconds=self.clock.monotonic()))
        )

    async def until(
        self,
        check: Callable[[], object],
        *,
        step: timedelta,
        limit: float,
        message: str,
    ) -> Any:
        """Advance by `step` at a time until `check` returns something truthy (awaited if a coroutine); fails
        when the clock passes `limit` seconds since its start first."""
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if self.clock.monotonic() >= limit:
                raise AssertionError(f"{message}: not by {limit} s on the clock (last value: {value!r}).")
            await self.advance(step)


@contextlib.asynccontextmanager
async def simulated(
    storage: base.Storage,
    client: UpstreamClient,
    upstream: MockUpstream,
    clock: clocks.ManualClock,
    routes: Mapping[str, Route],
    settings: DaemonSettings | None = None,
) -> AsyncIterator[tuple[Daemon, SimulatedTime]]:
    """A daemon on `clock` (its storage must read the same clock), settled at its start; on exit, stopped in
    order while the clock moves on (its shutdown grace is clock time too), and its failure raised."""
    daemon = Daemon(storage, client, routes, settings=settings or simulated_settings(), clock=clock)
    simulation = SimulatedTime(clock, daemon, upstream)
    task = asyncio.create_task(daemon.run())
    try:
        await simulation.settle()
        yield daemon, simulation
    finally:
        daemon.stop()
        deadline = time.monotonic() + 20
        while not task.done() and time.monotonic() < deadline:
            await clock.run_for(timedelta(milliseconds=100))
            await asyncio.wait({task}, timeout=0.005)
        if not task.done():
            task.cancel()
            raise AssertionError("The daemon did not stop within 20 s while its clock moved on.")
        await task  # raises its failure


@pytest.fixture
def manual_clock() -> clocks.ManualClock:
    return clocks.ManualClock()


@pytest.fixture
async def simulated_storage(backend: backends.Backend, manual_clock: clocks.ManualClock) -> base.Storage:
    """A migrated store on the test's database (each backend), reading time from `manual_clock`."""
    store = await backend.open_store(manual_clock)
    if not backend.is_postgres:
        await store.migrate()
    return store


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
