"""One claimed request, start to finish: call its upstream and turn the outcome into one fenced state write
(complete, fail, or reschedule with backoff), submitted to the daemon's pending writes (the next tick commits
it; the task does not wait). A call still running after `processing_mark_delay` is marked processing first
(`ProcessingMarks`).

A call still running at its batch's deadline is ended by the client's own timer (`send(..., deadline=)`);
nothing is written, and the expiry sweep fails the row with `batch_expired`. Other early ends are decided by the
daemon, which cancels the task and records why first:
- `cancelled`: its batch is being cancelled; the row ends `canceled` (unless a result already arrived: a result
  is kept, the work was done);
- `shutdown`: the daemon stops and the grace period is over; the row goes back to pending for another daemon;
- `fenced`: the daemon was declared dead; it writes nothing more (its writes would be refused).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Protocol

import orjson

from fusillade.clock import Clock
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.pending_writes import Done, PendingWrites, WriteResult
from fusillade.daemon.pools import Chosen, EndpointPools, call_health, ejection_policy
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import ids, models
from fusillade.domain.endpoint_pool import CallHealth
from fusillade.domain.retry import RetryPolicy, decide
from fusillade.metrics import DaemonMetrics, ModelMetrics
from fusillade.upstream import outcome as outcomes
from fusillade.upstream.classify import CONNECTION_ERROR, TIMEOUT
from fusillade.upstream.routes import Route

logger = logging.getLogger(__name__)

OVERLOAD_STATUSES = frozenset({429, 503, 504, 529})
"""Answers that say the upstream is over its capacity (an adaptive limit is cut on them)."""
OVERLOAD_CODES = frozenset({CONNECTION_ERROR, TIMEOUT})
"""Failures without an answer that say the same."""


class Upstream(Protocol):
    """What the executor needs of an upstream client (`fusillade.upstream.client.UpstreamClient`)."""

    async def send(
        self,
        request: models.ClaimedRequest,
        route: Route,
        *,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> outcomes.Outcome:
        """Call the upstream; never raises for upstream trouble; cancelling aborts the call; `TimeoutError`
        when the call is still running at `deadline` (event loop time)."""
        ...


class AbortReason(Enum):
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class Decision:
    write: models.RequestWrite
    retry_at: datetime | None = None
    """Set when the request was rescheduled."""
    gave_up: str | None = None
    """Why a retriable failure was not retried (`max_attempts` or `deadline`)."""


def completion(request: models.ClaimedRequest, result: outcomes.Success) -> models.Complete:
    """The `Complete` of a successful call, with the usage its response reported (None: unknown)."""
    spend = models.Spend(request.batch_id, request.owner, request.model, result.usage)
    return models.Complete(request.id, result.status_code, result.body, spend)


def decide_write(
    request: models.ClaimedRequest,
    result: outcomes.Outcome,
    *,
    policy: RetryPolicy,
    now: datetime,
    random_value: float,
    elsewhere: bool = False,
) -> Decision:
    """The state write an outcome calls for (pure). `elsewhere`: a retry may start at once on another endpoint
    of the route's pool (the failed one was the cause): no backoff, still an attempt."""
    if isinstance(result, outcomes.Success):
        return Decision(completion(request, result))
    if isinstance(result, outcomes.Permanent):
        return Decision(
            models.Fail(
                request_id=request.id,
                code=result.code,
                message=result.message,
                status_code=result.status_code,
                body=result.body,
            )
        )
    retry = decide(
        policy,
        attempt=request.attempt,
        now=now,
        deadline=request.deadline,
        retry_after=result.retry_after,
        random=random_value,
        immediate=elsewhere,
    )
    if retry.retry_at is not None:
        return Decision(
            models.Reschedule(
                request_id=request.id, not_before=retry.retry_at, code=result.code, message=result.message
            ),
            retry_at=retry.retry_at,
        )
    attempts = request.attempt + 1
    why = (
        f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}"
        if retry.reason == "max_attempts"
        else "no retry could start before the batch deadline"
    )
    return Decision(
        models.Fail(
            request_id=request.id,
            code=result.code,
            message=f"{result.message} ({why})",
            status_code=result.status_code,
            body=result.body,
        ),
        gave_up=retry.reason,
    )


class ProcessingMarks:
    """Which calls in flight are marked `processing`: a request is marked once its call has run for
    `processing_mark_delay` (the daemon's tick loop calls `submit_due`); a faster call goes from `claimed`
    straight to its result, one state write instead of two. One timer for all calls, not one per call."""

    def __init__(self, writes: PendingWrites) -> None:
        self._writes = writes
        self._unmarked: dict[ids.RequestId, float] = {}
        """Calls not marked yet, oldest first (insertion order), with their start (monotonic)."""
        self._marked: set[ids.RequestId] = set()

    def started(self, request_id: ids.RequestId, now: float) -> None:
        self._unmarked[request_id] = now

    def ended(self, request_id: ids.RequestId) -> bool:
        """Forget a call that ended; True if it had been marked."""
        if self._unmarked.pop(request_id, None) is not None:
            return False
        if request_id in self._marked:
            self._marked.discard(request_id)
            return True
        return False

    def submit_due(self, now: float, delay: float) -> float | None:
        """Submit the marks of calls running for `delay` or longer; returns when the next one is due."""
        cutoff = now - delay
        due = []
        for request_id, started in self._unmarked.items():
            if started > cutoff:
                break
            due.append(request_id)
        for request_id in due:
            del self._unmarked[request_id]
            self._marked.add(request_id)
            self._writes.submit(models.MarkProcessing(request_id))
        oldest = next(iter(self._unmarked.values()), None)
        return None if oldest is None else oldest + delay


class RequestExecutor:
    def __init__(
        self,
        *,
        client: Upstream,
        lanes: Lanes,
        writes: PendingWrites,
        marks: ProcessingMarks,
        settings: DaemonSettings,
        clock: Clock,
        metrics: DaemonMetrics,
        on_retry_scheduled: Callable[[datetime], None],
        on_lane_paused: Callable[[], None],
        pools: EndpointPools | None = None,
    ) -> None:
        """`pools`: the endpoint pools of routes with several endpoints (kept by the daemon across its lives)."""
        self._client = client
        self._pools = pools if pools is not None else EndpointPools()
        self._ejection = ejection_policy(settings.endpoint_cool_down, settings.endpoint_cool_down_max)
        self._lanes = lanes
        self._writes = writes
        self._marks = marks
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._on_retry_scheduled = on_retry_scheduled
        self._on_lane_paused = on_lane_paused
        self._random = random.Random()
        self._count_completed: dict[ModelMetrics, Done] = {}

    async def execute(
        self,
        request: models.ClaimedRequest,
        *,
        headers: Mapping[str, str] | None,
        abort_reason: Callable[[], AbortReason | None],
        finished: Callable[[], None],
    ) -> None:
        """Run the request's call and submit its state write (committed with the daemon's next tick; the task
        does not wait for it). Cancelling the task aborts the call; `abort_reason` then says why (None: the
        caller itself is being cancelled, and the cancellation propagates). `finished` is called at the end,
        however it ends, before the task ends: the write submitted and the slot freed reach the same tick.
        This coroutine is the call's task itself (see `Calls.start`): it logs a failure (a bug) instead of
        raising it."""
        try:
            start = self._start(request)
            if start is None:
                return
            route, deadline, request = start  # its fallback model's request when it falls back
            chosen = None
            if len(route.base_urls) > 1 or route.fallback is not None:
                # A pool, or a route that falls back when its upstream is down: choose the endpoint, knowing its
                # health (a route of one endpoint without a fallback pays nothing).
                key = self._metrics.label(request.model)  # a model's own route, or the default route's `*`
                chosen = self._pools.choose(key, route, self._clock.monotonic(), request.id)
                route = chosen.route
            # An adaptive limit learns from when the call was sent, with how many in flight (itself included).
            sent = (self._clock.monotonic(), self._lanes.in_flight(request.model)) if route.adaptive else None
            started = time.perf_counter()  # for the metrics only: the real duration of the call
            result: outcomes.Outcome | None = None
            try:
                result = await self._client.send(request, route, headers=headers, deadline=deadline)
            except TimeoutError:  # the batch deadline passed during the call: the expiry sweep fails the row
                self._metrics.model(request.model).latency["expired"].observe(time.perf_counter() - started)
                return
            except asyncio.CancelledError:
                reason = abort_reason()
                if reason is None:
                    raise
                await self._after_abort(request, reason)
                return
            finally:
                marked = self._marks.ended(request.id)
                elsewhere = chosen is not None and self._endpoint_done(request, chosen, result)
            assert result is not None  # the call returned
            duration = time.perf_counter() - started
            self._submit(request, result, marked=marked, duration=duration, elsewhere=elsewhere)
            if sent is not None:
                self._adapt(request.model, result, *sent)
        except Exception:
            logger.exception("Request %s: its task failed.", ids.request_wire(request.id))
        finally:
            finished()

    def _start(self, request: models.ClaimedRequest) -> tuple[Route, float, models.ClaimedRequest] | None:
        """The route and deadline (event loop time) of a call that may start now, and the request to send (its
        fallback model's when it escalates); None when it may not (its request is given back)."""
        route = self._lanes.route(request.model)
        if route is None:
            # The model left the routing table after the claim: give the request back.
            self._writes.submit(models.Release(request.id))
            return None
        settings = self._settings
        now = self._clock.now()
        if now - request.claimed_at > settings.claim_max_age:
            # Sending it now could double a call another daemon already made, over the model's limit.
            logger.warning(
                "Request %s: claimed %.1f s ago, too long for its call to start safely; given back unsent.",
                ids.request_wire(request.id),
                (now - request.claimed_at).total_seconds(),
            )
            self._metrics.stale_claims.inc()
            self._writes.submit(models.Release(request.id))
            return None
        self._marks.started(request.id, self._clock.monotonic())
        remaining = request.deadline + settings.expiry_grace - now
        deadline = asyncio.get_running_loop().time() + remaining.total_seconds()
        if route.fallback is not None:
            reason = self._fallback_reason(request, route, now)
            fallback = None if reason is None else self._fallback(request, route, reason)
            if fallback is not None:
                fallback_route, fallback_request = fallback
                return fallback_route, deadline, fallback_request
        return route, deadline, request

    def _fallback_reason(self, request: models.ClaimedRequest, route: Route, now: datetime) -> str | None:
        """Why the request goes to its route's fallback (`down`: every endpoint of its own is out; `deadline`:
        less than `fallback_when_remaining` is left), or None: it goes to its own."""
        if self._pools.all_down(self._metrics.label(request.model), self._clock.monotonic()):
            return "down"
        if route.fallback_when_remaining is not None and request.deadline - now < route.fallback_when_remaining:
            return "deadline"
        return None

    def _fallback(
        self, request: models.ClaimedRequest, route: Route, reason: str
    ) -> tuple[Route, models.ClaimedRequest] | None:
        """The fallback route of the request's model, and the request rewritten for it (its `model`, in the body
        too); None if the fallback has no route now. The call keeps its slot in its own model's lane."""
        assert route.fallback is not None
        target = self._lanes.route(route.fallback)
        if target is None:
            return None
        self._metrics.fell_back(request.model, route.fallback, reason)
        return target, for_model(request, route.fallback)

    def _submit(
        self,
        request: models.ClaimedRequest,
        result: outcomes.Outcome,
        *,
        marked: bool,
        duration: float,
        elsewhere: bool = False,
    ) -> None:
        """Submit the write the call's outcome calls for (`elsewhere`: a retry may start at once on another
        endpoint of the pool)."""
        instruments = self._metrics.model(request.model)
        if type(result) is outcomes.Success:
            # The common case, kept short: one write, counted by a callback made once per model label (which reads
            # the usage from the write: nothing is allocated per request to count it).
            instruments.latency["success"].observe(duration)
            self._writes.submit(completion(request, result), self._completed(instruments))
            if result.requests_used_up is not None:  # only ever set on a route with a rate limit
                self._pause_lane(request.model, result.requests_used_up)
            return
        instruments.latency[_result_label(result)].observe(duration)
        if isinstance(result, outcomes.Retriable) and result.status_code == 429:
            self._pause_lane(request.model, result.retry_after)
        decision = decide_write(
            request,
            result,
            policy=self._settings.retry,
            now=self._clock.now(),
            random_value=self._random.random(),
            elsewhere=elsewhere,
        )
        if not marked and isinstance(decision.write, models.Reschedule):
            self._writes.submit(models.MarkProcessing(request.id))  # a retry starts from processing
        # Once a result exists it is stored, even if the batch is cancelled meanwhile (the queue keeps a result
        # that arrived for a request cancelled in flight): nothing can cancel the submitted write.
        self._writes.submit(decision.write, functools.partial(self._count, request, decision))

    def replace_settings(self, settings: DaemonSettings) -> None:
        self._settings = settings
        self._ejection = ejection_policy(settings.endpoint_cool_down, settings.endpoint_cool_down_max)

    def _endpoint_done(
        self, request: models.ClaimedRequest, chosen: Chosen, result: outcomes.Outcome | None
    ) -> bool:
        """Tell the pool how the call to its endpoint went (None: it ended without an outcome); True when its
        request may be retried at once on another endpoint."""
        health = CallHealth.UNKNOWN if result is None else call_health(result)
        ejected = self._pools.finish(chosen, health, self._clock.monotonic(), self._ejection)
        if health is not CallHealth.FAILED and health is not CallHealth.UNREACHABLE:
            return False
        endpoint = chosen.endpoint
        self._metrics.endpoint_failed(request.model, endpoint.address, ejected=ejected)
        if ejected:
            logger.warning(
                "Endpoint %s of route %s ejected for %.3g s (%s).",
                endpoint.address,
                chosen.key,
                (endpoint.ejected_until or 0.0) - self._clock.monotonic(),
                "no connection" if health is CallHealth.UNREACHABLE else "failures in a row",
            )
        if chosen.route.fallback is not None and self._pools.all_down(chosen.key, self._clock.monotonic()):
            return True  # its next attempt goes to the fallback: at once
        return self._pools.retry_elsewhere(chosen, request.id)

    async def _after_abort(self, request: models.ClaimedRequest, reason: AbortReason) -> None:
        if reason is AbortReason.CANCELLED:
            written = await self._writes.write(models.Cancel(request.id))
            if written.applied:
                self._metrics.model(request.model).finished["canceled"].inc()
        elif reason is AbortReason.SHUTDOWN:
            await self._writes.write(models.Release(request.id))
        # FENCED: nothing may be written.

    def _adapt(self, model: str, result: outcomes.Outcome, sent_at: float, in_flight: int) -> None:
        """Tell the model's adaptive limit how the call went."""
        now = self._clock.monotonic()
        if type(result) is outcomes.Success:
            if self._lanes.succeeded(model, sent_at=sent_at, in_flight=in_flight, now=now):
                self._metrics.limit_cut(model, "latency")
        elif overload(result) and self._lanes.overloaded(model, sent_at=sent_at, now=now):
            self._metrics.limit_cut(model, "refused")

    def _pause_lane(self, model: str, retry_after: timedelta | None) -> None:
        if retry_after is None and self._lanes.is_adaptive(model):
            return  # a refusal without a time to wait: cutting the adaptive limit is the answer
        pause = retry_after if retry_after is not None else self._settings.rate_limit_pause
        if self._lanes.pause(model, self._clock.monotonic() + pause.total_seconds()):
            self._metrics.paused(model)
            self._on_lane_paused()

    def _completed(self, instruments: ModelMetrics) -> Done:
        """The callback that counts an applied `Complete` of one model label: the request completed, and the
        tokens its response reported (from the write's `Spend`). Made once per label."""
        counted = self._count_completed.get(instruments)
        if counted is None:
            completed = instruments.finished["completed"]
            spent = instruments.spent

            def counted(written: WriteResult, write: models.RequestWrite) -> None:
                if not written.applied:
                    logger.debug("A Complete write was refused (finished, expired or reclaimed meanwhile).")
                    return
                completed.inc()
                if type(write) is models.Complete and write.spend is not None:
                    spent(write.spend.usage)

            self._count_completed[instruments] = counted
        return counted

    def _count(
        self,
        request: models.ClaimedRequest,
        decision: Decision,
        written: WriteResult,
        _write: models.RequestWrite,
    ) -> None:
        if not written.applied:
            logger.debug("Write for request %s refused (finished, expired or reclaimed meanwhile).", request.id)
            return
        write = decision.write
        if isinstance(write, models.Reschedule):
            self._metrics.retried(request.model, write.code)
            assert decision.retry_at is not None
            self._on_retry_scheduled(decision.retry_at)
        elif isinstance(write, models.Fail):
            self._metrics.model(request.model).finished["failed"].inc()


def for_model(request: models.ClaimedRequest, model: str) -> models.ClaimedRequest:
    """The request as sent to another model: its `model`, and the body's, rewritten."""
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        body["model"] = model
        return dataclasses.replace(request, model=model, body=orjson.dumps(body).decode())
    return dataclasses.replace(request, model=model)


def overload(result: outcomes.Outcome) -> bool:
    """Whether the outcome says the upstream is over its capacity."""
    if not isinstance(result, outcomes.Retriable):
        return False
    if result.status_code is None:
        return result.code in OVERLOAD_CODES
    return result.status_code in OVERLOAD_STATUSES


def _result_label(result: outcomes.Outcome) -> str:
    if isinstance(result, outcomes.Success):
        return "success"
    return "retriable" if isinstance(result, outcomes.Retriable) else "permanent"
