"""A route's fallback on the real daemon, against two mock upstreams on real sockets: near its batch's deadline
(`fallback_when_remaining`) a request goes to the fallback model's route, with its `model` rewritten, and its
usage counts under the model that answered."""

from __future__ import annotations

from datetime import timedelta

from fusillade.mock_upstream import Behaviour, FixedLatency, MockUpstream
from fusillade.storage.sqlite.store import SqliteStorage
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from tests.integration.conftest import running
from tests.integration.test_daemon import finished
from tests.support import factories


async def test_near_the_deadline_the_rest_of_a_batch_goes_to_the_fallback(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(latency=FixedLatency(0.05))
    async with MockUpstream() as fallback_upstream:
        # The batch has 24 h; from 0.6 s after it was created, less than `fallback_when_remaining` is left.
        slow = Route(
            base_url=upstream.url,
            concurrency=2,
            fallback="big",
            fallback_when_remaining=timedelta(hours=24) - timedelta(seconds=0.6),
        )
        routes = {"small": slow, "big": Route(base_url=fallback_upstream.url, concurrency=8)}
        batch = await factories.create_batch(sqlite_storage, models_by_line=["small"] * 60)

        async with running(sqlite_storage, client, routes) as daemon:
            done = await finished(sqlite_storage, batch)

        assert done.counts.completed == 60
        sent_to_small = upstream.stats.requests_by_model.get("small", 0)
        sent_to_big = fallback_upstream.stats.requests_by_model.get("big", 0)
        assert 1 <= sent_to_small < 60 and sent_to_small + sent_to_big == 60, (sent_to_small, sent_to_big)
        # Each upstream saw only its own model: the fallback's calls had their model rewritten.
        assert set(upstream.stats.requests_by_model) == {"small"}
        assert set(fallback_upstream.stats.requests_by_model) == {"big"}
        by_model = {usage.model: usage.requests for usage in done.usage}
        assert by_model == {"small": sent_to_small, "big": sent_to_big}
        fell_back = daemon.metrics.registry.get_sample_value(
            "fusillade_fallbacks_total", {"model": "small", "fallback": "big", "reason": "deadline"}
        )
        assert fell_back == sent_to_big


async def test_without_a_route_for_the_fallback_the_request_goes_to_its_own(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    """A reload may drop the fallback's route: the request is then sent to its own model, not lost."""
    route = Route(base_url=upstream.url, concurrency=4, fallback="gone", fallback_when_remaining=timedelta(days=2))
    batch = await factories.create_batch(sqlite_storage, models_by_line=["small"] * 5)

    async with running(sqlite_storage, client, {"small": route}):
        done = await finished(sqlite_storage, batch)

    assert done.counts.completed == 5
    assert upstream.stats.requests_by_model == {"small": 5}


async def test_when_its_upstream_is_down_a_model_falls_back_and_nothing_fails(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    async with MockUpstream() as gone:
        dead_url = gone.url
    # Its only endpoint refuses connections: ejected at the first call, then every call goes to the fallback,
    # the failed one at once (no backoff), until a probe finds it back.
    routes = {
        "small": Route(base_url=dead_url, concurrency=4, fallback="big"),
        "big": Route(base_url=upstream.url, concurrency=4),
    }
    batch = await factories.create_batch(sqlite_storage, models_by_line=["small"] * 30)

    async with running(sqlite_storage, client, routes) as daemon:
        done = await finished(sqlite_storage, batch, within=20)

    assert (done.counts.completed, done.counts.failed) == (30, 0)
    assert upstream.stats.requests_by_model == {"big": 30}
    down = daemon.metrics.registry.get_sample_value(
        "fusillade_fallbacks_total", {"model": "small", "fallback": "big", "reason": "down"}
    )
    assert down is not None and down >= 26  # all but the calls in flight when the endpoint was ejected
