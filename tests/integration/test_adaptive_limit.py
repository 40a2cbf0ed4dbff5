"""An adaptive limit on the real daemon, against the mock upstream's capacity mode on a real socket: it finds
the capacity of an upstream that refuses above it, and of one that queues above it, from far above (the
ceiling). The limit lives in the process (the lanes), so SQLite alone runs these; the figures against a fixed
limit are in docs/benchmarks.md (bench/adaptive_limit.py)."""

from __future__ import annotations

from datetime import timedelta

from fusillade.domain.retry import RetryPolicy
from fusillade.metrics import DaemonMetrics
from fusillade.mock_upstream import Behaviour, FixedLatency, MockUpstream
from fusillade.storage.sqlite.store import SqliteStorage
from fusillade.upstream.client import UpstreamClient
from tests.integration.conftest import fast_settings, routes_for, running
from tests.integration.test_daemon import finished
from tests.support import factories

CAPACITY = 4
CEILING = 32
# A request refused again and again is retried, never failed: every request must complete.
RETRY = RetryPolicy(
    base_delay=timedelta(milliseconds=20), max_delay=timedelta(milliseconds=100), max_attempts=None
)
SETTINGS = fast_settings(retry=RETRY)


def sample(metrics: DaemonMetrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_an_upstream_that_refuses_above_its_capacity_gets_few_refusals(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(latency=FixedLatency(0.04), capacity=CAPACITY, over_capacity="refuse")
    batch = await factories.create_batch(sqlite_storage, models_by_line=["m"] * 300)
    routes = routes_for(upstream, {"m": CEILING}, adaptive=True)

    async with running(sqlite_storage, client, routes, SETTINGS) as daemon:
        done = await finished(sqlite_storage, batch)
        limit = sample(daemon.metrics, "fusillade_model_limit", {"model": "m"})

    assert done.counts.completed == 300
    refused = upstream.stats.responses_by_status.get(429, 0)
    calls = sum(upstream.stats.responses_by_status.values())
    assert refused >= 1  # it had to find the capacity
    assert refused <= 0.15 * calls, (refused, calls)
    assert sample(daemon.metrics, "fusillade_model_limit_cuts_total", {"model": "m", "reason": "refused"}) >= 1
    assert 1 <= limit <= 2 * CAPACITY, limit
    # No Retry-After came with the refusals: the lane was cut, never paused.
    assert sample(daemon.metrics, "fusillade_model_pauses_total", {"model": "m"}) == 0


async def test_a_fixed_limit_above_the_capacity_is_refused_far_more(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    """What the adaptive limit saves: the same upstream and batch with the ceiling as a fixed limit."""
    upstream.behaviour = Behaviour(latency=FixedLatency(0.04), capacity=CAPACITY, over_capacity="refuse")
    batch = await factories.create_batch(sqlite_storage, models_by_line=["m"] * 100)

    async with running(sqlite_storage, client, routes_for(upstream, {"m": CEILING}), SETTINGS):
        done = await finished(sqlite_storage, batch)

    assert done.counts.completed == 100
    refused = upstream.stats.responses_by_status.get(429, 0)
    assert refused > 0.3 * sum(upstream.stats.responses_by_status.values())


async def test_an_upstream_that_queues_above_its_capacity_gets_a_limit_near_it(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(latency=FixedLatency(0.04), capacity=CAPACITY, over_capacity="queue")
    batch = await factories.create_batch(sqlite_storage, models_by_line=["m"] * 400)
    routes = routes_for(upstream, {"m": CEILING}, adaptive=True)

    async with running(sqlite_storage, client, routes, SETTINGS) as daemon:
        done = await finished(sqlite_storage, batch)
        limit = sample(daemon.metrics, "fusillade_model_limit", {"model": "m"})

    assert done.counts.completed == 400
    assert upstream.stats.responses_by_status.get(429, 0) == 0
    assert sample(daemon.metrics, "fusillade_model_limit_cuts_total", {"model": "m", "reason": "latency"}) >= 1
    assert 1 <= limit <= 3 * CAPACITY, limit
