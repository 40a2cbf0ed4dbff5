"""The daemon's timing decisions on simulated time: a real database (each backend) and the mock upstream on a
real socket, but one `ManualClock` for the daemon and its storage. Time moves only when a test moves it, once
the daemon settled (`SimulatedTime`), so each test can say "not at 1.9 s, at 2 s" without a real sleep, and a
slow machine can only make the test slower, never wrong.

Moments are seconds on the clock since the test started (`simulation.elapsed`); calls are timed by the clock when
the daemon hands them to the upstream client (`TimedClient`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, cast

from fusillade import clock as clocks
from fusillade.daemon import Daemon
from fusillade.domain import models, states
from fusillade.mock_upstream import (
    Behaviour,
    ConnectionReset,
    HttpError,
    MockUpstream,
    StallBeforeFirstByte,
    UniformLatency,
)
from fusillade.storage import base
from fusillade.upstream import outcome
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from tests.integration.conftest import batch_status, routes_for, simulated, simulated_settings
from tests.integration.test_daemon_survival import fenced_count
from tests.support import factories, polling

State = states.RequestState
STEP = timedelta(milliseconds=50)
SECOND = timedelta(seconds=1)
PROMPT = 0.5
"""How late after its moment a timer may act, in clock seconds: a few steps (a claim may still be on its way
when a step ends). Every timer below is much longer, so acting on time and acting late are told apart."""


class TimedClient:
    """The real upstream client, noting the clock's time each call is handed to it (by custom id)."""

    def __init__(self, inner: UpstreamClient, clock: clocks.ManualClock) -> None:
        self._inner = inner
        self._clock = clock
        self.sent: defaultdict[str, list[float]] = defaultdict(list)

    def calls(self) -> int:
        return sum(len(moments) for moments in self.sent.values())

    async def send(
        self,
        request: models.ClaimedRequest,
        route: Route,
        *,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> outcome.Outcome:
        self.sent[request.custom_id].append(self._clock.monotonic())
        return await self._inner.send(request, route, headers=headers, deadline=deadline)


async def request_states(storage: base.Storage, batch: models.Batch) -> dict[str, models.Request]:
    return {request.custom_id: request for request in await factories.all_requests(storage, batch.id)}


async def finished(storage: base.Storage, batch: models.Batch) -> models.Batch | None:
    current = await batch_status(storage, batch)
    return current if current.completed_at or current.cancelled_at or current.expired_at else None


async def test_a_retriable_failure_is_retried_once_its_backoff_passed_on_the_clock(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    upstream.behaviour = Behaviour(faults_by_custom_id={"req-1": [HttpError(503)]})
    batch = await factories.create_batch(simulated_storage, count=1)
    timed = TimedClient(client, manual_clock)
    start = manual_clock.now()
    # The idle poll is an hour away: only the due retry's own timer can wake the claim in time.
    settings = simulated_settings(idle_poll_interval=timedelta(hours=1))

    async with simulated(
        simulated_storage,
        cast(UpstreamClient, timed),
        upstream,
        manual_clock,
        routes_for(upstream, {"model-a": 4}),
        settings,
    ) as (_, simulation):
        await polling.until(lambda: upstream.stats.requests_total == 1, message="the first attempt")
        await simulation.settle()
        (request,) = (await request_states(simulated_storage, batch)).values()
        assert (request.state, request.attempt) == (State.PENDING, 1)
        assert request.not_before == start + timedelta(seconds=2)  # the policy's first backoff, no jitter

        await simulation.advance_to(1.9)
        assert timed.calls() == 1, "retried before its backoff passed"

        await simulation.until(lambda: timed.calls() == 2, step=STEP, limit=3.0, message="the retry")
        done = await simulation.until(
            lambda: finished(simulated_storage, batch), step=STEP, limit=6.0, message="the batch to finish"
        )

    (first, second) = timed.sent["req-1"]
    assert first == 0.0
    assert 2.0 <= second <= 2.0 + PROMPT
    assert done.counts.completed == 1


async def test_a_429_with_retry_after_pauses_the_model_lane_until_the_clock_passes_it(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    upstream.behaviour = Behaviour(faults_by_custom_id={"req-1": [HttpError(429, retry_after_s=5)]})
    batch = await factories.create_batch(simulated_storage, count=3)
    timed = TimedClient(client, manual_clock)
    settings = simulated_settings(idle_poll_interval=timedelta(hours=1))

    async with simulated(
        simulated_storage,
        cast(UpstreamClient, timed),
        upstream,
        manual_clock,
        routes_for(upstream, {"model-a": 1}),
        settings,
    ) as (_, simulation):
        await polling.until(lambda: upstream.stats.requests_total == 1, message="the first call, answered 429")
        await simulation.advance_to(4.9)
        assert timed.calls() == 1, "a call of the paused lane started before its Retry-After passed"
        pending = await request_states(simulated_storage, batch)
        assert pending["req-2"].state is State.PENDING and pending["req-3"].state is State.PENDING

        await simulation.until(lambda: timed.calls() >= 2, step=STEP, limit=7.0, message="the lane to resume")
        resumed_at = simulation.elapsed
        await simulation.until(
            lambda: finished(simulated_storage, batch), step=STEP, limit=20.0, message="the batch to finish"
        )

    assert 5.0 <= resumed_at <= 5.0 + PROMPT
    assert timed.sent["req-1"][0] == 0.0
    assert timed.sent["req-1"][1] >= 5.0  # the Retry-After is also the floor of the request's own retry
    assert min(timed.sent["req-2"] + timed.sent["req-3"]) >= 5.0


async def test_the_requests_of_a_daemon_whose_heartbeats_stopped_are_reclaimed_only_after_stale_after(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    batch = await factories.create_batch(simulated_storage, count=4)
    silent = await factories.register(simulated_storage, "silent-host")
    assert len(await factories.claim(simulated_storage, silent)) == 4  # then it goes silent
    timed = TimedClient(client, manual_clock)
    settings = simulated_settings()  # stale_after 30 s, heartbeats every 5 s, sweeps every second
    assert settings.stale_after == timedelta(seconds=30)

    async with simulated(
        simulated_storage,
        cast(UpstreamClient, timed),
        upstream,
        manual_clock,
        routes_for(upstream, {"model-a": 4}),
        settings,
    ) as (daemon, simulation):
        await simulation.advance_to(29.5)
        assert timed.calls() == 0
        held = await request_states(simulated_storage, batch)
        assert {(request.state, request.daemon_id) for request in held.values()} == {(State.CLAIMED, silent)}

        await simulation.until(lambda: timed.calls() == 4, step=STEP, limit=35.0, message="the reclaimed requests")
        reclaimed_at = simulation.elapsed
        done = await simulation.until(
            lambda: finished(simulated_storage, batch), step=STEP, limit=40.0, message="the batch to finish"
        )
        assert daemon.metrics.registry.get_sample_value("fusillade_requests_reclaimed_total") == 4

    # Reclaimed by the first sweep after the heartbeat went stale (sweeps run every second).
    assert 30.0 <= reclaimed_at <= 31.0 + PROMPT
    assert done.counts.completed == 4
    daemons = {record.id: record for record in await simulated_storage.list_daemons()}
    assert daemons[silent].status is states.DaemonStatus.DEAD


async def test_a_call_is_marked_processing_once_it_ran_for_the_processing_mark_delay(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    upstream.behaviour = Behaviour(faults_by_custom_id={"req-1": [StallBeforeFirstByte(None)]})
    batch = await factories.create_batch(simulated_storage, count=1)
    start = manual_clock.now()
    settings = simulated_settings(processing_mark_delay=timedelta(seconds=3))

    async with simulated(
        simulated_storage, client, upstream, manual_clock, routes_for(upstream, {"model-a": 1}), settings
    ) as (_, simulation):
        await polling.until(lambda: upstream.stats.in_flight == 1, message="the call to hang")
        await simulation.settle()
        await simulation.advance_to(2.9)
        (request,) = (await request_states(simulated_storage, batch)).values()
        assert (request.state, request.started_at) == (State.CLAIMED, None)

        await simulation.advance_to(3.0)

        async def marked() -> models.Request | None:
            (current,) = (await request_states(simulated_storage, batch)).values()
            return current if current.state is State.PROCESSING else None

        request = await polling.until(marked, message="the processing mark")

    assert request.started_at == start + timedelta(seconds=3)


async def test_an_expired_batch_ends_its_unfinished_requests_batch_expired_when_the_clock_passes_expires_at(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    """One call hangs, holding the model's only slot; the other requests wait pending. At `expires_at` (a
    minute after creation) the sweep ends both kinds `batch_expired`; one second before, nothing has ended."""
    upstream.behaviour = Behaviour(faults_by_custom_id={"req-1": [StallBeforeFirstByte(None)]})
    batch = await factories.create_batch(simulated_storage, count=3, window="1m")
    assert batch.expires_at == manual_clock.now() + timedelta(minutes=1)
    settings = simulated_settings(cancellation_poll_interval=timedelta(seconds=5))

    async with simulated(
        simulated_storage, client, upstream, manual_clock, routes_for(upstream, {"model-a": 1}), settings
    ) as (_, simulation):
        await polling.until(lambda: upstream.stats.in_flight == 1, message="the call to hang")
        await simulation.advance_to(59.0)
        assert await finished(simulated_storage, batch) is None
        assert {request.state for request in (await request_states(simulated_storage, batch)).values()} == {
            State.PROCESSING,
            State.PENDING,
        }

        done = await simulation.until(
            lambda: finished(simulated_storage, batch), step=STEP, limit=62.0, message="the batch to expire"
        )
        expired_at = simulation.elapsed

    assert 60.0 <= expired_at <= 61.0 + PROMPT
    assert done.status is states.BatchStatus.EXPIRED
    output, error = await factories.result_lines(simulated_storage, batch)
    assert output == []
    assert sorted(line["custom_id"] for line in error) == ["req-1", "req-2", "req-3"]
    assert {line["error"]["code"] for line in error} == {"batch_expired"}


async def test_work_created_without_a_notice_is_found_by_the_idle_poll_on_the_clock(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    settings = simulated_settings(idle_poll_interval=timedelta(seconds=10))
    timed = TimedClient(client, manual_clock)

    async with simulated(
        simulated_storage,
        cast(UpstreamClient, timed),
        upstream,
        manual_clock,
        routes_for(upstream, {"model-a": 4}),
        settings,
    ) as (_, simulation):
        # Created by another process (no `notify_work`), while the daemon polls an empty queue.
        batch = await factories.create_batch(simulated_storage, count=2)
        await simulation.advance_to(9.9)
        assert timed.calls() == 0

        await simulation.until(lambda: timed.calls() == 2, step=STEP, limit=12.0, message="the idle poll")
        polled_at = simulation.elapsed
        done = await simulation.until(
            lambda: finished(simulated_storage, batch), step=STEP, limit=15.0, message="the batch to finish"
        )

    assert 10.0 <= polled_at <= 10.0 + PROMPT
    assert done.counts.completed == 2


# ------------------------------------------------------------- moved here from real-clock tests (test_daemon*.py)


async def test_retriable_errors_are_retried_no_earlier_than_retry_after(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    # 32% of the requests fail at first with a retriable error (429 with Retry-After, 5xx, 408, a reset
    # connection), 4% with a permanent 400.
    scripts: dict[str, list[HttpError | ConnectionReset | None]] = {}
    for line in range(1, 201):
        custom_id = f"req-{line}"
        if line % 50 == 0:
            scripts[custom_id] = [HttpError(429, retry_after_s=7)]
        elif line % 10 == 5:
            scripts[custom_id] = [HttpError(503), HttpError(500)]
        elif line % 10 == 7:
            scripts[custom_id] = [ConnectionReset()]
        elif line % 10 == 9:
            scripts[custom_id] = [HttpError(408)]
        elif line % 25 == 3:
            scripts[custom_id] = [HttpError(400, message="bad request")]
    upstream.behaviour = Behaviour(faults_by_custom_id=scripts)
    batch = await factories.create_batch(simulated_storage, count=200)
    timed = TimedClient(client, manual_clock)

    async with simulated(
        simulated_storage,
        cast(UpstreamClient, timed),
        upstream,
        manual_clock,
        routes_for(upstream, {"model-a": 16}),
    ) as (_, simulation):
        done = await simulation.until(
            lambda: finished(simulated_storage, batch), step=SECOND, limit=120.0, message="the batch to finish"
        )

    assert done.counts.total == 200 and done.counts.active == 0
    attempts = upstream.stats.attempts_by_custom_id
    permanent = {custom_id for custom_id, script in scripts.items() if script[0] == HttpError(400, "bad request")}
    assert done.counts.failed == len(permanent) == 8
    for custom_id in permanent:
        assert len(attempts[custom_id]) == 1, "a permanent 4xx was retried"
    for custom_id, script in scripts.items():
        if custom_id in permanent:
            continue
        assert len(attempts[custom_id]) == len(script) + 1, custom_id
        sent = timed.sent[custom_id]
        # Each retry waits its backoff (2 s, then 4 s: the policy's, without jitter), or the Retry-After.
        floors = [7.0] if script[0] == HttpError(429, retry_after_s=7) else [2.0, 4.0][: len(script)]
        assert [
            round(later - earlier, 6) >= floor
            for earlier, later, floor in zip(sent, sent[1:], floors, strict=False)
        ] == [True] * len(floors), (custom_id, sent)
    output, error = await factories.result_lines(simulated_storage, batch)
    assert len(output) == 192 and len(error) == 8
    assert {line["custom_id"] for line in error} == permanent
    assert all(line["response"]["status_code"] == 400 for line in error)


class Paused:
    """The real store as seen by a daemon whose process gets paused (SIGSTOP, a VM pause) right after the
    database committed one of its claims: the claim's answer, its heartbeats and its sweeps wait until `thaw`,
    and it sends nothing to the database meanwhile."""

    def __init__(self, inner: base.Storage) -> None:
        self._inner = inner
        self._running = asyncio.Event()
        self._running.set()
        self.pause_after_next_claim = True
        self.claimed_before_pause: list[models.ClaimedRequest] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def thaw(self) -> None:
        self._running.set()

    async def apply_writes_and_claim(self, *args: Any, **kwargs: Any) -> Any:
        await self._running.wait()
        report, claimed = await self._inner.apply_writes_and_claim(*args, **kwargs)
        if claimed and self.pause_after_next_claim:
            self.pause_after_next_claim = False
            self.claimed_before_pause = claimed
            self._running.clear()
        await self._running.wait()
        return report, claimed

    async def heartbeat(self, *args: Any, **kwargs: Any) -> Any:
        await self._running.wait()
        return await self._inner.heartbeat(*args, **kwargs)

    async def reclaim_requests(self, *args: Any, **kwargs: Any) -> Any:
        await self._running.wait()
        return await self._inner.reclaim_requests(*args, **kwargs)


async def test_a_daemon_paused_past_stale_after_does_not_send_what_it_claimed_before_the_pause(
    simulated_storage: base.Storage,
    upstream: MockUpstream,
    client: UpstreamClient,
    manual_clock: clocks.ManualClock,
) -> None:
    """A claim answered after a pause longer than `stale_after` names requests the other daemons have since
    reclaimed and sent: starting them would send them twice and over the model's limit. They are given back
    unsent, and the paused daemon, declared dead meanwhile, registers again."""
    upstream.behaviour = Behaviour(latency=UniformLatency(0.002, 0.005))
    batch = await factories.create_batch(simulated_storage, count=24)
    routes = routes_for(upstream, {"model-a": 4})
    paused = Paused(simulated_storage)
    first = Daemon(cast(base.Storage, paused), client, routes, settings=simulated_settings(), clock=manual_clock)
    first_task = asyncio.create_task(first.run())
    try:
        await polling.until(lambda: paused.claimed_before_pause, message="a claim, then the pause")
        async with simulated(simulated_storage, client, upstream, manual_clock, routes) as (second, simulation):
            second.notify_work()
            done = await simulation.until(
                lambda: finished(simulated_storage, batch), step=SECOND, limit=60.0, message="the batch to finish"
            )
            reclaimed_at = simulation.elapsed
            paused.thaw()
            await polling.until(lambda: fenced_count(first) == 1, message="the paused daemon fenced")
            assert not first_task.done()
    finally:
        paused.thaw()
        first_task.cancel()
        with contextlib.suppress(BaseException):
            await first_task

    assert reclaimed_at >= simulated_settings().stale_after.total_seconds()
    assert done.counts.completed == 24
    stale = {request.custom_id for request in paused.claimed_before_pause}
    assert stale, "the paused claim held no request"
    sent = {custom_id: len(arrivals) for custom_id, arrivals in upstream.stats.attempts_by_custom_id.items()}
    assert sent == {f"req-{n}": 1 for n in range(1, 25)}, "a request sent twice"
    released = first.metrics.registry.get_sample_value("fusillade_stale_claims_released_total")
    assert released == len(stale)
