"""A pool of two endpoints on the real daemon, two mock upstreams on real sockets: one is killed mid-run, and
every request still completes. The pools live in the process (each daemon its own view), so SQLite alone runs
these."""

from __future__ import annotations

import time
from datetime import timedelta

from fusillade.domain.endpoint_pool import address
from fusillade.domain.retry import RetryPolicy
from fusillade.metrics import DaemonMetrics
from fusillade.mock_upstream import Behaviour, FixedLatency, MockUpstream
from fusillade.storage.sqlite.store import SqliteStorage
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from tests.integration.conftest import batch_status, fast_settings, running
from tests.integration.test_daemon import finished
from tests.support import factories, polling

CONCURRENCY = 8
REQUESTS = 500
# A backoff far longer than the test: a request its endpoint failed must be retried elsewhere at once.
SLOW_RETRIES = RetryPolicy(base_delay=timedelta(seconds=60), max_delay=timedelta(seconds=60), max_attempts=4)
SETTINGS = fast_settings(
    retry=SLOW_RETRIES,
    endpoint_cool_down=timedelta(milliseconds=150),
    endpoint_cool_down_max=timedelta(milliseconds=300),
)


def sample(metrics: DaemonMetrics, name: str, endpoint: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": "m", "endpoint": endpoint}) or 0.0


async def test_a_pool_with_one_endpoint_killed_mid_run_completes_every_request(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    behaviour = Behaviour(latency=FixedLatency(0.02))
    upstream.behaviour = behaviour
    killed, survivor = upstream, await MockUpstream(behaviour).start()
    killed_address, survivor_address = address(killed.url), address(survivor.url)
    try:
        routes = {"m": Route(base_urls=(killed.url, survivor.url), concurrency=CONCURRENCY)}
        batch = await factories.create_batch(sqlite_storage, models_by_line=["m"] * REQUESTS)
        started = time.monotonic()
        async with running(sqlite_storage, client, routes, SETTINGS) as daemon:
            # Both endpoints share the work until one dies.
            await polling.until(lambda: killed.stats.requests_total >= 60, message="calls to both endpoints")
            served_by_killed = killed.stats.requests_total
            assert survivor.stats.requests_total >= 30
            await killed.close()
            done = await finished(sqlite_storage, batch)
        elapsed = time.monotonic() - started

        assert done.counts.completed == REQUESTS
        assert done.counts.failed == 0
        assert (await batch_status(sqlite_storage, batch)).counts.failed == 0
        assert served_by_killed + survivor.stats.requests_total >= REQUESTS
        # The retries of the requests the dead endpoint failed went to the other one at once, not after the
        # 60 s backoff.
        assert elapsed < 30, elapsed
        metrics = daemon.metrics
        retried = metrics.registry.get_sample_value(
            "fusillade_request_retries_total", {"model": "m", "code": "connection_error"}
        )
        assert retried is not None and retried >= 1
        errors = sample(metrics, "fusillade_endpoint_errors_total", killed_address)
        ejections = sample(metrics, "fusillade_endpoint_ejections_total", killed_address)
        # Ejected, then probed back (and ejected again) at least once while the survivor finished the batch.
        assert ejections >= 2, ejections
        # Every call to the dead endpoint failed: those in flight (or sent on a pooled connection) when it died,
        # at most the model's limit, and one probe per cool-down, each ending in a new ejection.
        assert errors <= CONCURRENCY + (ejections - 1), (errors, ejections)
        assert sample(metrics, "fusillade_endpoint_ejected", killed_address) == 1
        assert sample(metrics, "fusillade_endpoint_errors_total", survivor_address) == 0
        assert sample(metrics, "fusillade_endpoint_ejections_total", survivor_address) == 0
        assert sample(metrics, "fusillade_endpoint_in_flight", survivor_address) == 0
        assert survivor.stats.responses_by_status == {200: survivor.stats.requests_total}
    finally:
        await survivor.close()


async def test_a_pool_spreads_calls_over_its_endpoints_and_a_reload_keeps_it_going(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    behaviour = Behaviour(latency=FixedLatency(0.01))
    upstream.behaviour = behaviour
    first, second = upstream, await MockUpstream(behaviour).start()
    try:
        batch = await factories.create_batch(sqlite_storage, models_by_line=["m"] * 200)
        single = {"m": Route(base_url=first.url, concurrency=CONCURRENCY)}
        async with running(sqlite_storage, client, single, SETTINGS) as daemon:
            await polling.until(lambda: first.stats.requests_total >= 20, message="calls to the single endpoint")
            assert second.stats.requests_total == 0
            daemon.replace_routes({"m": Route(base_urls=(first.url, second.url), concurrency=CONCURRENCY)})
            done = await finished(sqlite_storage, batch)

        assert done.counts.completed == 200
        # After the reload the calls were spread: the newcomer took a fair share of the rest.
        assert second.stats.requests_total >= 40, (first.stats.requests_total, second.stats.requests_total)
        assert second.stats.max_in_flight <= CONCURRENCY
        assert first.stats.max_in_flight + second.stats.max_in_flight <= 2 * CONCURRENCY
    finally:
        await second.close()


async def test_the_default_routes_models_share_its_pool_and_a_single_upstream_has_none(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    first, second = upstream, await MockUpstream().start()
    try:
        default = Route(base_urls=(first.url, second.url), concurrency=4)
        solo = {"solo": Route(base_url=second.url, concurrency=4)}
        batch = await factories.create_batch(sqlite_storage, models_by_line=["x", "y", "solo"] * 40)
        async with running(sqlite_storage, client, solo, SETTINGS, default_route=default) as daemon:
            done = await finished(sqlite_storage, batch)

        assert done.counts.completed == 120
        assert first.stats.requests_by_model.keys() == {"x", "y"}  # the solo model never went to the pool
        registry = daemon.metrics.registry
        series = {
            (sample.labels["model"], sample.labels["endpoint"])
            for metric in registry.collect()
            if metric.name == "fusillade_endpoint_in_flight"
            for sample in metric.samples
        }
        assert series == {("*", address(first.url)), ("*", address(second.url))}
    finally:
        await second.close()


async def test_an_endpoint_answering_only_5xx_is_ejected_after_a_streak_and_only_probed_after(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    failing = upstream
    failing.behaviour = Behaviour(error_rates={502: 1.0})
    healthy = await MockUpstream(Behaviour(latency=FixedLatency(0.01))).start()
    try:
        routes = {"m": Route(base_urls=(failing.url, healthy.url), concurrency=CONCURRENCY)}
        batch = await factories.create_batch(sqlite_storage, models_by_line=["m"] * 300)
        async with running(sqlite_storage, client, routes, SETTINGS) as daemon:
            done = await finished(sqlite_storage, batch)

        assert (done.counts.completed, done.counts.failed) == (300, 0)
        ejections = sample(daemon.metrics, "fusillade_endpoint_ejections_total", address(failing.url))
        assert ejections >= 1
        # A streak of 3 ejected it; calls already in flight then (at most the limit) and one probe per later
        # ejection are all it got.
        calls = failing.stats.requests_total
        assert calls <= 3 + CONCURRENCY + (ejections - 1), (calls, ejections)
        assert sample(daemon.metrics, "fusillade_endpoint_errors_total", address(failing.url)) == calls
        assert healthy.stats.responses_by_status == {200: 300}
    finally:
        await healthy.close()
