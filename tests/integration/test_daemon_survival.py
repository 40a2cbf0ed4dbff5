"""The daemon under trouble: its database connections killed, declared dead by others, a loop that crashes;
and its knobs changed while it runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from fusillade import clock as clocks
from fusillade.daemon import Daemon
from fusillade.domain import models, states
from fusillade.mock_upstream import Behaviour, FixedLatency, MockUpstream, UniformLatency
from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from tests.integration.conftest import fast_settings, routes_for, running
from tests.integration.test_daemon import finished
from tests.support import backends, factories, polling


@pytest.fixture
async def postgres_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[backends.Backend]:
    handle = backends.Backend(
        "postgres",
        tmp_path,
        server=request.getfixturevalue("postgres_server"),
        template=request.getfixturevalue("postgres_template"),
    )
    await handle.setup()
    try:
        yield handle
    finally:
        await handle.aclose()


@pytest.mark.postgres
async def test_killed_database_connections_do_not_stop_the_daemon(
    postgres_backend: backends.Backend, upstream: MockUpstream, client: UpstreamClient
) -> None:
    storage = await postgres_backend.open_store(clocks.SystemClock())
    upstream.behaviour = Behaviour(latency=UniformLatency(0.005, 0.02))
    batch = await factories.create_batch(storage, count=800)
    killer = await asyncpg.connect(postgres_backend.location)
    kills = 0
    try:
        async with running(storage, client, routes_for(upstream, {"model-a": 16})) as daemon:
            for threshold in (100, 250, 400, 550):
                await polling.until(lambda t=threshold: upstream.stats.requests_total >= t, message=f"{threshold}")
                kills += await killer.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            done = await finished(storage, batch, tolerate_outages=True)
            failures = sum(
                sample.value
                for metric in daemon.metrics.database_errors.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            )
    finally:
        await killer.close()

    assert kills > 0
    assert done.counts.completed == 800
    output, _ = await factories.result_lines(storage, batch)
    assert Counter(line["custom_id"] for line in output) == {f"req-{n}": 1 for n in range(1, 801)}
    assert failures > 0, "no database call failed: the connections were not killed while in use"


def fenced_count(daemon: Daemon) -> float:
    return sum(
        sample.value
        for metric in daemon.metrics.fenced.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def test_a_daemon_declared_dead_drops_its_calls_writes_nothing_more_and_registers_again(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(latency=FixedLatency(30.0))
    batch = await factories.create_batch(storage, count=10)
    daemon = Daemon(storage, client, routes_for(upstream, {"model-a": 4}), settings=fast_settings())
    task = asyncio.create_task(daemon.run())
    try:
        await polling.until(lambda: upstream.stats.in_flight == 4, message="calls hanging")
        first_life = daemon.daemon_id
        assert first_life is not None
        first_calls = set(upstream.stats.attempts_by_custom_id)
        await storage.mark_daemon_dead(first_life)

        await polling.until(
            lambda: fenced_count(daemon) == 1, within=5, message="the daemon to find it was fenced"
        )
        await polling.until(
            lambda: daemon.daemon_id not in (None, first_life), within=5, message="a new registration"
        )
        # Its old calls were dropped unanswered; the reclaimed requests go out again under the new id.
        await polling.until(
            lambda: upstream.stats.in_flight == 4 and len(upstream.stats.attempts_by_custom_id) >= 4,
            within=10,
            message="calls of the second life",
        )
        assert not task.done()
        current = await storage.get_batch(batch.id, owner=models.ALL_OWNERS)
        assert current.counts.terminal == 0  # nothing written for the calls it abandoned
        resent = {
            custom_id for custom_id, arrivals in upstream.stats.attempts_by_custom_id.items() if len(arrivals) > 1
        }
        assert resent <= first_calls  # only what was in flight at the fencing can go out twice
        daemons = {item.id: item for item in await storage.list_daemons()}
        assert daemons[first_life].status is states.DaemonStatus.DEAD
        assert daemons[daemon.daemon_id].status is states.DaemonStatus.RUNNING
    finally:
        daemon.stop()
        async with asyncio.timeout(15):
            await task  # an orderly stop: no exception


async def test_a_daemon_that_learns_of_its_fencing_from_a_refused_write_claims_again_in_its_next_life(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    """Fenced by a tick (its results refused) rather than by its heartbeat: the slots that tick had reserved for
    its claim are free again in the next life, which finishes the batch."""
    upstream.behaviour = Behaviour(latency=FixedLatency(0.3))
    batch = await factories.create_batch(storage, count=12)
    settings = fast_settings(heartbeat_interval=timedelta(seconds=20), stale_after=timedelta(seconds=30))
    daemon = Daemon(storage, client, routes_for(upstream, {"model-a": 4}), settings=settings)
    task = asyncio.create_task(daemon.run())
    try:
        await polling.until(lambda: upstream.stats.in_flight == 4, message="calls under way")
        assert daemon.daemon_id is not None
        await storage.mark_daemon_dead(daemon.daemon_id)  # their results will be refused
        done = await finished(storage, batch, within=30)
    finally:
        daemon.stop()
        async with asyncio.timeout(15):
            await task
    assert fenced_count(daemon) == 1
    assert done.counts.completed == 12


class _FinalizeBug:
    """The real storage, except that `finalize_batches` fails the way a bug would (not a database error)."""

    def __init__(self, inner: base.Storage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def finalize_batches(self, *, limit: int = 100) -> list[object]:
        raise RuntimeError("a bug in a side loop")


async def test_a_crashed_loop_stops_the_daemon_loudly_and_in_order(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    broken = cast(base.Storage, _FinalizeBug(storage))
    daemon = Daemon(broken, client, routes_for(upstream, {"model-a": 4}), settings=fast_settings())
    with pytest.raises(RuntimeError, match="a bug in a side loop"):
        async with asyncio.timeout(10):
            await daemon.run()
    (record,) = await storage.list_daemons()
    assert record.status == states.DaemonStatus.DEAD


async def test_a_raised_limit_applies_while_running(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(latency=FixedLatency(0.05))
    batch = await factories.create_batch(storage, count=200)
    async with running(storage, client, routes_for(upstream, {"model-a": 2})) as daemon:
        await polling.until(lambda: upstream.stats.requests_total >= 20, message="work under way")
        assert upstream.stats.max_in_flight_by_model["model-a"] == 2
        daemon.replace_routes(routes_for(upstream, {"model-a": 6}))
        await polling.until(
            lambda: upstream.stats.max_in_flight_by_model["model-a"] == 6, message="the new limit in use"
        )
        await finished(storage, batch)
    assert upstream.stats.max_in_flight_by_model["model-a"] == 6


async def test_deleted_batches_are_purged_on_the_interval(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    batch = await factories.create_batch(storage, count=50)
    await storage.delete_batch(batch.id, owner=models.ALL_OWNERS)
    settings = fast_settings(purge_interval=timedelta(milliseconds=100), purge_batch_size=20)
    async with running(storage, client, routes_for(upstream, {"model-a": 4}), settings) as daemon:
        await polling.until(
            lambda: daemon.metrics.registry.get_sample_value("fusillade_rows_purged_total") == 53,
            message="50 requests, the batch and its two result files purged",
        )
    assert await storage.purge_deleted(limit=1000) == 0
    assert upstream.stats.requests_total == 0


class HangingUpkeep:
    """The real store, except that its queue upkeep never returns: a vacuum of a big table, or one on a
    connection whose network went silent (it has a time limit of its own, minutes long)."""

    def __init__(self, inner: base.Storage) -> None:
        self._inner = inner
        self.upkeeps_started = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def maintain_queue(self) -> None:
        self.upkeeps_started += 1
        await asyncio.Event().wait()


async def test_a_queue_upkeep_that_hangs_holds_up_no_sweep(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    """Found by the silent-network scenario (tests/reliability): the vacuum ran in line with the maintenance
    sweeps, so while it hung no batch was finalized or expired and no dead daemon's work was reclaimed."""
    hanging = HangingUpkeep(storage)
    async with running(cast(base.Storage, hanging), client, routes_for(upstream, {"model-a": 4})) as daemon:
        await polling.until(lambda: hanging.upkeeps_started >= 1, message="the upkeep to start (and hang)")
        batch = await factories.create_batch(storage, count=10)
        daemon.notify_work()
        done = await finished(storage, batch, within=10)
    assert done.completed_at is not None
    assert done.counts.completed == 10
    assert hanging.upkeeps_started == 1  # still hanging when the batch was finalized
