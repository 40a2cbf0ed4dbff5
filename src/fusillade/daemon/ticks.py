"""The tick scheduler: the daemon's link to the queue.

```
 wake ──► tick: ONE trip to the database (`apply_writes_and_claim`): commit the state writes that came in
   ▲      (group commit), then claim for the free slots; each claimed request starts a call (`Calls`)
   │      up to `ticks_in_flight` ticks at once: slots freed during one trip are claimed for by the next
   └── a write submitted, a slot freed, new work (`want_claim`), a due retry, a lane resuming after a 429,
       a processing mark due, the idle poll
```

What a tick claims (`_claim_order`) comes from the lanes: each model's free slots, none for a model paused by a
429 or out of request tokens (a rate limit: the lanes' buckets say when to wake), with the owners' calls in flight
for fairness. The slots a claim asks for are reserved until its answer, so that no other tick claims them twice.
All timers read the daemon's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from datetime import datetime, timedelta
from typing import NamedTuple

from fusillade import errors
from fusillade.daemon.backoff import Backoff
from fusillade.daemon.calls import Calls
from fusillade.daemon.executor import ProcessingMarks, RequestExecutor
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.loops import DaemonFenced, LoopContext, cancel_all
from fusillade.daemon.pending_writes import Group, PendingWrites
from fusillade.domain import ids, models
from fusillade.storage.base import RequestQueue

logger = logging.getLogger(__name__)


class _ClaimOrder(NamedTuple):
    capacities: list[models.ModelCapacity]
    limit: int
    owner_in_flight: dict[str, int] | None
    asked_at: float
    """When it was made (monotonic): the moment of the bucket levels its answer reports."""


class TickScheduler:
    def __init__(self, queue: RequestQueue, lanes: Lanes, calls: Calls, context: LoopContext) -> None:
        self._queue = queue
        self._lanes = lanes
        self._calls = calls
        self._context = context
        self._wake = asyncio.Event()
        self._claim_wanted = True
        self._uncertain = False
        """A claim failed without a clear answer (see `_release_orphans`)."""
        self._retries_due: list[float] = []
        """When each rescheduled request falls due (monotonic), a heap: every one wakes a claim, not only the
        earliest (a later one forgotten would wait for the idle poll, or miss its batch's deadline)."""
        self._discover = lanes.has_default
        """Ask the queue which models have pending work (for the default route) at the next claim."""
        self._discovered_at = float("-inf")

    # ------------------------------------------------------------------------------------- what wakes it

    def wake(self) -> None:
        """Look again now (a write arrived, a lane paused, a tick ended, a stop)."""
        self._wake.set()

    def want_claim(self, *, discover: bool = False) -> None:
        """Claim at the next tick (a slot freed, work reclaimed or created); with `discover`, also learn which
        models have pending work first (new work may be for a model the default route serves)."""
        if discover:
            self._discover = self._lanes.has_default
        self._claim_wanted = True
        self._wake.set()

    def retry_scheduled(self, retry_at: datetime) -> None:
        """A request was rescheduled for `retry_at`: claim when it falls due."""
        clock = self._context.clock
        due = clock.monotonic() + max(0.0, (retry_at - clock.now()).total_seconds())
        heapq.heappush(self._retries_due, due)
        if self._retries_due[0] == due:
            self._wake.set()

    def new_life(self) -> None:
        """Forget the last life's timers (its rescheduled requests are no longer this daemon's)."""
        self._retries_due.clear()
        self._claim_wanted, self._uncertain = True, False

    # ----------------------------------------------------------------------------------------- the loop

    async def run(
        self, daemon_id: ids.DaemonId, writes: PendingWrites, marks: ProcessingMarks, executor: RequestExecutor
    ) -> None:
        """Tick until the daemon stops and its last writes are committed. A fencing or a bug in a tick stops the
        loop with it."""
        context, clock = self._context, self._context.clock
        ticks: set[asyncio.Task[None]] = set()
        backoff = context.backoff()
        idle = True
        last_tick = float("-inf")
        try:
            while True:
                # Under load, let writes and freed slots gather a moment: fewer, larger trips cost less per
                # request (a commit and a claim each), and the loop serves the calls meanwhile.
                gap = context.settings.min_tick_interval.total_seconds() - (clock.monotonic() - last_tick)
                if gap > 0 and not context.stop.is_set():
                    await clock.sleep(gap)
                for tick in [tick for tick in ticks if tick.done()]:
                    ticks.discard(tick)
                    tick.result()  # a fenced daemon, or a bug: the loop stops with it
                stopping = context.stop.is_set()
                if stopping and not writes and not self._calls and not ticks:
                    return
                self._wake.clear()
                if len(ticks) >= context.settings.ticks_in_flight or (self._uncertain and ticks):
                    await self._wake.wait()  # a tick ending sets it
                    continue
                if self._uncertain and not stopping:
                    # A failed claim may have committed after all, leaving requests claimed in our name that no
                    # task runs. Give those back before claiming again (no other claim is under way now).
                    try:
                        await self._release_orphans(daemon_id, writes)
                    except errors.StorageError as exc:
                        await context.database_failed("claim", exc, backoff)
                        continue
                    self._uncertain = False
                try:
                    claim = None if stopping else await self._claim_order()
                except errors.StorageError as exc:
                    await context.database_failed("claim", exc, backoff)
                    continue
                next_mark = marks.submit_due(
                    clock.monotonic(), context.settings.processing_mark_delay.total_seconds()
                )
                if claim is None and not writes.ready():
                    idle_poll = None if stopping else context.settings.idle_poll_interval
                    await self._sleep_until_woken(idle_poll, next_mark)
                    idle = True
                    continue
                if idle and claim is None and not stopping:
                    await self._gather_writes(writes)
                idle = False
                last_tick = clock.monotonic()
                tick = asyncio.create_task(
                    self._tick(daemon_id, writes, writes.take_group(), claim, executor, backoff, stopping)
                )
                tick.add_done_callback(self._tick_ended)
                ticks.add(tick)
        finally:
            await cancel_all(list(ticks))

    def _tick_ended(self, tick: asyncio.Task[None]) -> None:
        self._wake.set()

    async def _sleep_until_woken(self, idle: timedelta | None, next_mark: float | None) -> None:
        """Nothing to do: wait for a wake, or the earliest timer (the idle poll, a processing mark, a due retry,
        a lane resuming)."""
        clock = self._context.clock
        now = clock.monotonic()
        deadlines = [now + idle.total_seconds()] if idle is not None else []
        if next_mark is not None:
            deadlines.append(next_mark)
        if self._retries_due:
            deadlines.append(self._retries_due[0])
        if (resume := self._lanes.next_resume()) is not None:
            deadlines.append(resume)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        try:
            await clock.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            self._claim_wanted = True  # a timer ran out: the idle poll, a due retry or a lane resuming
        now = clock.monotonic()
        while self._retries_due and self._retries_due[0] <= now:
            heapq.heappop(self._retries_due)
            self._claim_wanted = True

    async def _gather_writes(self, writes: PendingWrites) -> None:
        """After an idle spell, let other writes join the first one for up to `commit_max_delay`; a slot
        freed (a claim to make) or a stop ends the wait."""
        context, clock = self._context, self._context.clock
        deadline = clock.monotonic() + context.settings.commit_max_delay.total_seconds()
        while len(writes) < writes.max_size and not self._claim_wanted and not context.stop.is_set():
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await clock.wait_for(self._wake.wait(), remaining)

    # ----------------------------------------------------------------------------------------- one tick

    async def _claim_order(self) -> _ClaimOrder | None:
        """What to claim now, or None (nothing wanted, or no free slot)."""
        if not self._claim_wanted:
            return None
        settings, clock = self._context.settings, self._context.clock
        if self._lanes.has_default and (
            self._discover
            or clock.monotonic() - self._discovered_at >= settings.idle_poll_interval.total_seconds()
        ):
            self._lanes.learn(await self._queue.pending_models())
            self._discover = False
            self._discovered_at = clock.monotonic()
        self._claim_wanted = False
        capacities = self._lanes.capacities(clock.monotonic())
        if not capacities:
            return None
        self._lanes.reserve(capacities)  # until the claim's answer: another tick must not claim these slots
        if self._lanes.any_rated:
            self._lanes.spend_ahead(capacities, clock.monotonic())
        return _ClaimOrder(
            capacities,
            min(settings.claim_batch_size, sum(capacity.free for capacity in capacities)),
            self._lanes.owners_in_flight() or None,
            clock.monotonic(),
        )

    async def _tick(
        self,
        daemon_id: ids.DaemonId,
        writes: PendingWrites,
        group: Group,
        claim: _ClaimOrder | None,
        executor: RequestExecutor,
        backoff: Backoff,
        stopping: bool,
    ) -> None:
        started = time.perf_counter()  # for the metrics only: the real cost of the trip
        try:
            report, claimed = await self._queue.apply_writes_and_claim(
                daemon_id,
                group.writes,
                claim.capacities if claim else (),
                limit=claim.limit if claim else 0,
                owner_in_flight=claim.owner_in_flight if claim else None,
            )
        except errors.StateConflict as exc:
            writes.put_back(group)
            if claim is not None:  # the next life claims with the same lanes
                self._lanes.unreserve(claim.capacities)
                self._rate_answered(claim, None)
            raise DaemonFenced(
                f"Daemon {daemon_id} was declared dead by the others; it stops so that requests they took "
                "over are not sent twice."
            ) from exc
        except errors.StorageError as exc:
            writes.put_back(group)
            if claim is not None:
                self._lanes.unreserve(claim.capacities)
                self._rate_answered(claim, None)
                self._uncertain = True
                self._claim_wanted = True
            # While stopping, the stop event cannot cut the pause short: keep backing off.
            task = "commit" if group else "claim"
            await self._context.database_failed(task, exc, backoff, interruptible=not stopping)
            return
        except BaseException:
            # Cancelled at shutdown, or a bug: the writes go back (to be committed, or answered when the
            # stopping daemon abandons them), so that nothing waits on them forever.
            writes.put_back(group)
            if claim is not None:
                self._lanes.unreserve(claim.capacities)
                self._rate_answered(claim, None)
            raise
        backoff.succeeded()
        elapsed = time.perf_counter() - started
        metrics = self._context.metrics
        if group:
            metrics.commit_duration.observe(elapsed)
            metrics.commit_size.observe(len(group))
            if refused := writes.settle(group, report):
                metrics.write_conflicts.inc(refused)
        if claim is not None:
            metrics.claim_duration.observe(elapsed)
            metrics.claim_size.observe(len(claimed))
            self._lanes.unreserve(claim.capacities)
            self._rate_answered(claim, claimed)
            # Claim again at once if this claim was cut by its limit (more may be waiting); otherwise when
            # woken: a slot freed, new work, a due retry, a lane resuming, or the idle timer.
            if len(claimed) >= claim.limit:
                self._claim_wanted = True
            for request in claimed:
                self._calls.start(request, executor)

    def _rate_answered(self, claim: _ClaimOrder, claimed: models.Claimed | None) -> None:
        if self._lanes.any_rated:
            self._lanes.claim_answered(claim.capacities, claimed, claim.asked_at)

    async def _release_orphans(self, daemon_id: ids.DaemonId, writes: PendingWrites) -> None:
        busy = writes.waiting_for()
        orphans = [
            request_id
            for request_id in await self._queue.held_requests(daemon_id)
            if request_id not in self._calls and request_id not in busy
        ]
        if orphans:
            logger.warning("Releasing %d requests claimed by a claim whose answer was lost.", len(orphans))
            for request_id in orphans:
                writes.submit(models.Release(request_id))
