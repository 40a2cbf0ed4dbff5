"""One claimed request, start to finish: mark it processing, call its upstream, and turn the outcome into one
fenced state write (complete, fail, or reschedule with backoff), committed by the group-commit writer.

How a call ends early is decided by the daemon, which cancels the task and records why first:
- `cancelled`: its batch is being cancelled; the row ends `canceled` (unless a result already arrived: a result
  is kept, the work was done);
- `expired`: the batch deadline passed during the call; the expiry sweep fails the row with `batch_expired`;
- `shutdown`: the daemon stops and the grace period is over; the row goes back to pending for another daemon;
- `fenced`: the daemon was declared dead; it writes nothing more (its writes would be refused).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Protocol

from fusillade.clock import Clock
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.settings import DaemonSettings
from fusillade.daemon.writer import GroupCommitWriter
from fusillade.domain import ids, models
from fusillade.domain.retry import RetryPolicy, decide
from fusillade.metrics import DaemonMetrics
from fusillade.upstream import outcome as outcomes
from fusillade.upstream.routes import Route

logger = logging.getLogger(__name__)


class Upstream(Protocol):
    """What the executor needs of an upstream client (`fusillade.upstream.client.UpstreamClient`)."""

    async def send(
        self, request: models.ClaimedRequest, route: Route, *, headers: Mapping[str, str] | None = None
    ) -> outcomes.Outcome:
        """Call the upstream; never raises for upstream trouble; cancelling aborts the call."""
        ...


class AbortReason(Enum):
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SHUTDOWN = "shutdown"
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class Decision:
    write: models.RequestWrite
    retry_at: datetime | None = None
    """Set when the request was rescheduled."""
    gave_up: str | None = None
    """Why a retriable failure was not retried (`max_attempts` or `deadline`)."""


def decide_write(
    request: models.ClaimedRequest,
    result: outcomes.Outcome,
    *,
    policy: RetryPolicy,
    now: datetime,
    random_value: float,
) -> Decision:
    """The state write an outcome calls for (pure)."""
    if isinstance(result, outcomes.Success):
        return Decision(models.Complete(request.id, result.status_code, result.body))
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


class RequestExecutor:
    def __init__(
        self,
        *,
        client: Upstream,
        lanes: Lanes,
        writer: GroupCommitWriter,
        settings: DaemonSettings,
        clock: Clock,
        metrics: DaemonMetrics,
        on_retry_scheduled: Callable[[datetime], None],
        on_lane_paused: Callable[[], None],
    ) -> None:
        self._client = client
        self._lanes = lanes
        self._writer = writer
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._on_retry_scheduled = on_retry_scheduled
        self._on_lane_paused = on_lane_paused
        self._random = random.Random()

    async def execute(
        self,
        request: models.ClaimedRequest,
        *,
        headers: Mapping[str, str] | None,
        abort_reason: Callable[[], AbortReason | None],
    ) -> None:
        """Run the request to a state write. Cancelling the task aborts the call; `abort_reason` then says why
        (None: the caller itself is being cancelled, and the cancellation propagates)."""
        route = self._lanes.route(request.model)
        if route is None:
            # The model left the routing table after the claim: give the request back.
            await self._writer.submit(models.Release(request.id))
            return
        self._writer.submit(models.MarkProcessing(request.id))
        started = time.perf_counter()
        try:
            result = await self._call_until_deadline(request, route, headers)
        except asyncio.CancelledError:
            reason = abort_reason()
            if reason is None:
                raise
            await self._after_abort(request, reason)
            return
        if result is None:  # the batch deadline passed during the call
            self._metrics.model(request.model).latency["expired"].observe(time.perf_counter() - started)
            return
        self._metrics.model(request.model).latency[_result_label(result)].observe(time.perf_counter() - started)
        if isinstance(result, outcomes.Retriable) and result.status_code == 429:
            self._pause_lane(request.model, result.retry_after)
        decision = decide_write(
            request, result, policy=self._settings.retry, now=self._clock.now(), random_value=self._random.random()
        )
        # The write is awaited while shielded: once a result exists it must be stored, even if the batch is
        # cancelled meanwhile (the queue keeps a result that arrived for a request cancelled in flight).
        pending_write = self._writer.submit(decision.write)
        try:
            written = await asyncio.shield(pending_write)
        except asyncio.CancelledError:
            if abort_reason() is None:
                raise
            written = await pending_write
        self._count(request, decision, applied=written.applied)

    async def _call_until_deadline(
        self, request: models.ClaimedRequest, route: Route, headers: Mapping[str, str] | None
    ) -> outcomes.Outcome | None:
        remaining = (request.deadline + self._settings.expiry_grace - self._clock.now()).total_seconds()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await self._client.send(request, route, headers=headers)
        except TimeoutError:
            return None

    def replace_settings(self, settings: DaemonSettings) -> None:
        self._settings = settings

    async def release(self, request_id: ids.RequestId) -> None:
        """Give back a request this daemon holds but does not run."""
        await self._writer.submit(models.Release(request_id))

    async def _after_abort(self, request: models.ClaimedRequest, reason: AbortReason) -> None:
        if reason is AbortReason.CANCELLED:
            written = await self._writer.submit(models.Cancel(request.id))
            if written.applied:
                self._metrics.model(request.model).finished["canceled"].inc()
        elif reason is AbortReason.SHUTDOWN:
            await self._writer.submit(models.Release(request.id))
        # EXPIRED: the expiry sweep fails the row; FENCED: nothing may be written.

    def _pause_lane(self, model: str, retry_after: timedelta | None) -> None:
        pause = retry_after if retry_after is not None else self._settings.rate_limit_pause
        if self._lanes.pause(model, time.monotonic() + pause.total_seconds()):
            self._metrics.lane_pauses.labels(model).inc()
            self._on_lane_paused()

    def _count(self, request: models.ClaimedRequest, decision: Decision, *, applied: bool) -> None:
        if not applied:
            logger.debug("Write for request %s refused (finished, expired or reclaimed meanwhile).", request.id)
            return
        write = decision.write
        if isinstance(write, models.Reschedule):
            self._metrics.retries.labels(request.model, write.code or "").inc()
            assert decision.retry_at is not None
            self._on_retry_scheduled(decision.retry_at)
        elif isinstance(write, models.Complete):
            self._metrics.model(request.model).finished["completed"].inc()
        elif isinstance(write, models.Fail):
            self._metrics.model(request.model).finished["failed"].inc()


def _result_label(result: outcomes.Outcome) -> str:
    if isinstance(result, outcomes.Success):
        return "success"
    return "retriable" if isinstance(result, outcomes.Retriable) else "permanent"
