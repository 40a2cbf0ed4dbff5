"""The daemon end to end within one process: a real database (each test on SQLite and PostgreSQL), the mock
upstream on a real socket, the real aiohttp client. Assertions read the database and the upstream's own
records."""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import timedelta

import orjson

from fusillade import errors
from fusillade.domain import ids, models, states
from fusillade.mock_upstream import (
    Behaviour,
    EmbeddedError,
    MockUpstream,
    StallBeforeFirstByte,
    StallMidStream,
    UniformLatency,
)
from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import PhaseTimeouts, Route
from tests.integration.conftest import batch_status, fast_settings, routes_for, running
from tests.support import factories, polling

LIMITS = {"model-a": 4, "model-b": 8, "model-c": 16}


async def finished(
    storage: base.Storage, batch: models.Batch, *, within: float = 60.0, tolerate_outages: bool = False
) -> models.Batch:
    """Poll until the batch finished; with `tolerate_outages`, a poll that finds the database unavailable
    (the test is killing connections) just polls again."""

    async def check() -> models.Batch | None:
        try:
            current = await batch_status(storage, batch)
        except errors.StorageUnavailable:
            if not tolerate_outages:
                raise
            return None
        return current if current.completed_at or current.cancelled_at or current.expired_at else None

    return await polling.until(check, within=within, interval=0.05, message="the batch to finish")


async def test_a_mixed_batch_completes_within_every_model_limit(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(latency=UniformLatency(0.001, 0.004))
    names = list(LIMITS)
    models_by_line = [names[line % 3] for line in range(2000)]
    batch = await factories.create_batch(storage, models_by_line=models_by_line)

    async with running(storage, client, routes_for(upstream, LIMITS)):
        done = await finished(storage, batch)

    assert done.status == states.BatchStatus.COMPLETED
    assert done.counts.completed == 2000
    output, error = await factories.result_lines(storage, batch)
    assert error == []
    assert Counter(line["custom_id"] for line in output) == {f"req-{n}": 1 for n in range(1, 2001)}
    stats = upstream.stats
    for model, limit in LIMITS.items():
        assert 0 < stats.max_in_flight_by_model[model] <= limit, (model, stats.max_in_flight_by_model)
    assert stats.requests_total == 2000
    # The stored body is the upstream's answer for that line.
    first = next(line for line in output if line["custom_id"] == "req-1")
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["model"] == models_by_line[0]
    assert first["response"]["body"]["choices"][0]["message"]["content"].startswith("Mock reply")


async def test_streamed_bodies_are_reassembled_and_stream_faults_handled(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(
        faults_by_custom_id={
            "req-2": [StallMidStream(after_events=1, seconds=None)],
            "req-3": [EmbeddedError(after_events=1, status=400, message="context too long")],
        }
    )
    batch = await factories.create_batch(storage, count=5)
    timeouts = PhaseTimeouts(first_byte=timedelta(seconds=5), idle=timedelta(milliseconds=300))

    async with running(storage, client, routes_for(upstream, {"model-a": 4}, stream=True, timeouts=timeouts)):
        done = await finished(storage, batch)

    assert done.counts.completed == 4 and done.counts.failed == 1
    output, error = await factories.result_lines(storage, batch)
    by_id = {line["custom_id"]: line for line in output}
    body = by_id["req-1"]["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("Mock reply to")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] > 0
    assert len(upstream.stats.attempts_by_custom_id["req-2"]) == 2, "the stalled stream was not retried"
    assert "req-2" in by_id
    (embedded,) = error
    assert embedded["custom_id"] == "req-3"
    assert "context too long" in orjson.dumps(embedded).decode()


async def test_cancel_aborts_calls_in_flight_within_a_second(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    batch = await factories.create_batch(storage, count=40)
    # The first 8 requests (claimed first) are answered; every later call hangs until aborted.
    hang = [StallBeforeFirstByte(None)]
    upstream.behaviour = Behaviour(faults_by_custom_id={f"req-{n}": hang for n in range(9, 41)})

    async with running(storage, client, routes_for(upstream, {"model-a": 8})):
        await polling.until(lambda: upstream.stats.in_flight == 8, message="8 calls hanging")
        cancelled_at = time.monotonic()
        await storage.cancel_batch(batch.id, owner=models.ALL_OWNERS)
        await polling.until(lambda: upstream.stats.in_flight == 0, within=5, message="calls aborted")
        aborted_after = time.monotonic() - cancelled_at
        done = await finished(storage, batch)

    assert aborted_after < 1.0, f"calls in flight were aborted only after {aborted_after:.2f} s"
    assert done.status == states.BatchStatus.CANCELLED
    output, error = await factories.result_lines(storage, batch)
    assert len(output) == done.counts.completed == 8
    assert len(output) + len(error) == 40
    assert {line["error"]["code"] for line in error} == {"batch_cancelled"}


async def test_a_batch_past_its_window_expires_even_when_the_upstream_hangs(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(
        faults_by_custom_id={"req-1": [None]}, fault_rates={StallBeforeFirstByte(seconds=None): 1.0}
    )
    batch = await factories.create_batch(storage, count=10, window="2s")

    async with running(storage, client, routes_for(upstream, {"model-a": 4})):
        done = await finished(storage, batch, within=15)

    assert done.status == states.BatchStatus.EXPIRED
    output, error = await factories.result_lines(storage, batch)
    assert [line["custom_id"] for line in output] == ["req-1"]
    assert len(error) == 9
    assert {line["error"]["code"] for line in error} == {"batch_expired"}
    await polling.until(lambda: upstream.stats.in_flight == 0, within=5, message="hanging calls aborted")


async def test_stop_releases_unfinished_work_and_another_daemon_finishes_it(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(latency=UniformLatency(0.2, 0.3))
    batch = await factories.create_batch(storage, count=60)
    settings = fast_settings(shutdown_grace=timedelta(milliseconds=50))

    async with running(storage, client, routes_for(upstream, {"model-a": 10}), settings) as first:
        await polling.until(lambda: upstream.stats.requests_total >= 10, message="work started")
    assert first.in_flight == 0
    daemons = await storage.list_daemons()
    assert [daemon.status for daemon in daemons] == [states.DaemonStatus.DEAD]
    current = await batch_status(storage, batch)
    assert current.counts.in_progress == 0, "a stopped daemon kept requests claimed"

    upstream.behaviour = Behaviour()
    async with running(storage, client, routes_for(upstream, {"model-a": 10})):
        done = await finished(storage, batch)
    assert done.counts.completed == 60
    output, _ = await factories.result_lines(storage, batch)
    assert Counter(line["custom_id"] for line in output) == {f"req-{n}": 1 for n in range(1, 61)}


async def test_new_work_wakes_the_claim_loop_before_its_timer(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    settings = fast_settings(idle_poll_interval=timedelta(seconds=30))
    async with running(storage, client, routes_for(upstream, {"model-a": 4}), settings) as daemon:
        registry = daemon.metrics.registry
        await polling.until(
            lambda: registry.get_sample_value("fusillade_claim_size_count"), message="a first, empty claim"
        )
        batch = await factories.create_batch(storage, count=3)
        daemon.notify_work()
        done = await finished(storage, batch, within=5)
    assert done.counts.completed == 3


async def test_calls_carry_identity_metadata_and_trace_headers(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    batch = await factories.create_batch(storage, count=5, metadata={"project": "eval-7", "other": "x"})
    settings = fast_settings(batch_metadata_headers=("project",), traceparent=True)
    routes = routes_for(upstream, {"model-a": 2}, api_key="sk-upstream-secret")

    async with running(storage, client, routes, settings):
        await finished(storage, batch)

    requests = {request.custom_id: request for request in await factories.all_requests(storage, batch.id)}
    seen = list(upstream.stats.recent_headers)
    assert len(seen) == 5
    for headers in seen:
        request = requests[headers["x-fusillade-custom-id"]]
        assert headers["x-fusillade-request-id"] == ids.request_wire(request.id)
        assert headers["x-fusillade-batch-id"] == ids.batch_wire(batch.id)
        assert headers["x-fusillade-batch-project"] == "eval-7"
        assert "x-fusillade-batch-other" not in headers
        assert headers["authorization"] == "Bearer sk-upstream-secret"
        assert re.fullmatch(f"00-{request.id.hex}-[0-9a-f]{{16}}-01", headers["traceparent"])


async def test_models_without_a_route_of_their_own_use_the_default_route(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    batch = await factories.create_batch(storage, models_by_line=["listed", "other-1", "other-2", "other-1"])
    default = Route(base_url=upstream.url, concurrency=1)

    async with running(storage, client, routes_for(upstream, {"listed": 2}), default_route=default):
        done = await finished(storage, batch, within=15)

    assert done.counts.completed == 4
    assert upstream.stats.requests_by_model == {"listed": 1, "other-1": 2, "other-2": 1}
    assert upstream.stats.max_in_flight_by_model["other-1"] == 1
