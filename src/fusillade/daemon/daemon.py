"""The daemon: its loops, and how it starts and stops.

```
 register ──► tick loop ──► one task per claimed request: call the upstream, submit the state write, end
                 │  each tick: ONE trip to the database (`apply_writes_and_claim`): commit the writes that came
                 │  in, then claim for the free slots; up to `ticks_in_flight` trips at once
                 ▲  wakes on: a write submitted, a slot freed, new work (notify_work), a due retry, a lane
                    resuming, a processing mark due, the idle timer
 side loops: heartbeat · maintenance (reclaim dead daemons' work, expire, finalize) · cancellation · purge
```

Survival rules:
- A failing database call in any loop is logged, counted and retried with backoff; the loop goes on.
- A loop that crashes (a bug) stops the daemon loudly: `run` raises it after the orderly stop below.
- If the heartbeat (or a write) finds this daemon declared dead (its heartbeats missed `stale_after`: a long
  pause, a database locked or away, and another daemon may have reclaimed its work), it drops its calls in
  flight at once and writes nothing more under that id, then registers again under a new id and goes on:
  the requests it had go back to pending through the usual reclaim and are sent again.
- `stop()` (SIGTERM/SIGINT in the CLI): no more claims; in-flight calls get `shutdown_grace` to finish; the rest
  are aborted and released to pending; the tick loop commits the last writes; the daemon is marked dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import NamedTuple, TypeVar

from fusillade import errors
from fusillade.clock import Clock, SystemClock
from fusillade.daemon.backoff import Backoff
from fusillade.daemon.executor import AbortReason, ProcessingMarks, RequestExecutor, Upstream
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.settings import DaemonSettings
from fusillade.daemon.writer import Group, PendingWrites
from fusillade.domain import ids, models
from fusillade.metrics import DaemonMetrics
from fusillade.storage.base import Storage
from fusillade.upstream.routes import Route

logger = logging.getLogger(__name__)
T = TypeVar("T")

_HEADER_SAFE_METADATA = 256
_BATCH_HEADER_CACHE = 1024


class _ClaimOrder(NamedTuple):
    capacities: list[models.ModelCapacity]
    limit: int
    owner_in_flight: dict[str, int] | None


class DaemonFenced(errors.FusilladeError):
    """This daemon was declared dead (its heartbeat went stale) and its requests may have been reclaimed by
    another daemon; it stopped without writing anything more."""


class Daemon:
    """Runs the stored requests of one storage: `run()` until `stop()` (or `run_until_signalled`). Call
    `notify_work()` after creating a batch in the same process; `replace_routes()` and `replace_settings()`
    apply a reload while it runs."""

    def __init__(
        self,
        storage: Storage,
        client: Upstream,
        routes: Mapping[str, Route],
        *,
        default_route: Route | None = None,
        settings: DaemonSettings | None = None,
        clock: Clock | None = None,
        metrics: DaemonMetrics | None = None,
        version: str = "0",
    ) -> None:
        self._storage = storage
        self._client = client
        self._settings = settings or DaemonSettings()
        self._clock = clock or SystemClock()
        self.metrics = metrics or DaemonMetrics()
        self._version = version
        self._lanes = Lanes(routes, default_route)
        self.metrics.use_routes(routes)
        self.metrics.count_in_flight(self._lanes.models_in_flight)
        self._discover = default_route is not None
        self._discovered_at = 0.0
        self._daemon_id: ids.DaemonId | None = None
        self._tasks: dict[ids.RequestId, asyncio.Task[None]] = {}
        self._abort_reasons: dict[ids.RequestId, AbortReason] = {}
        self._wake = asyncio.Event()
        self._maintenance_wake = asyncio.Event()
        self._stop = asyncio.Event()
        """Set to end the current life: by `stop()`, or by a fencing (then cleared for the next life)."""
        self._stop_requested = False
        self._retries_due: list[float] = []
        """When each rescheduled request falls due (monotonic), a heap: every one wakes a claim, not only the
        earliest (a later one forgotten would wait for the idle poll, or miss its batch's deadline)."""
        self._claim_wanted = True
        self._uncertain = False
        """A claim failed without a clear answer (see `_release_orphans`)."""
        self._batch_headers: dict[ids.BatchId, dict[str, str]] = {}
        self._settings_listeners: list[Callable[[DaemonSettings], None]] = []

    # ------------------------------------------------------------------------------------- public surface

    @property
    def daemon_id(self) -> ids.DaemonId | None:
        """Set once the daemon registered."""
        return self._daemon_id

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def notify_work(self) -> None:
        """New work may be claimable (a batch was created or retried in this process): claim now."""
        self._discover = self._lanes.has_default
        self._want_claim()

    def replace_routes(self, routes: Mapping[str, Route], default_route: Route | None = None) -> None:
        """New routing table (limits, upstreams, the route of models without their own); applies to the next
        claim and the next calls."""
        self._lanes.replace_routes(routes, default_route)
        self.metrics.use_routes(routes)
        self._discover = default_route is not None
        self._want_claim()

    def replace_settings(self, settings: DaemonSettings) -> None:
        """New knobs (a configuration reload): each loop uses them from its next round."""
        self._settings = settings
        for listener in self._settings_listeners:
            listener(settings)
        self._want_claim()

    def stop(self) -> None:
        """Ask for an orderly stop (safe to call from a signal handler via `loop.call_soon_threadsafe`)."""
        self._stop_requested = True
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Run until `stop()`; raises a crashed loop's exception after stopping. Declared dead by the others
        (fenced), it registers again under a new id and goes on."""
        while not self._stop_requested:
            daemon = await self._retrying("register", self._register)
            if daemon is None:  # stopped before it could register
                return
            try:
                await self._run_as(daemon)
                return
            except DaemonFenced as fenced:
                self.metrics.fenced.inc()
                if self._stop_requested:
                    return
                logger.warning("%s Registering again to go on.", fenced)
                self._stop.clear()
                self._retries_due.clear()  # those requests are no longer this daemon's
                self._claim_wanted, self._uncertain = True, False

    async def _run_as(self, daemon: models.Daemon) -> None:
        """One life of the daemon, under one id: until `stop()`, a crash, or `DaemonFenced`."""
        self._daemon_id = daemon.id
        logger.info("Daemon %s started (models: %s).", daemon.id, ", ".join(self._lanes.model_names) or "none")
        writes = PendingWrites(max_size=self._settings.commit_max_size, on_arrival=self._wake.set)
        marks = ProcessingMarks(writes)
        executor = RequestExecutor(
            client=self._client,
            lanes=self._lanes,
            writes=writes,
            marks=marks,
            settings=self._settings,
            clock=self._clock,
            metrics=self.metrics,
            on_retry_scheduled=self._retry_scheduled,
            on_lane_paused=self._wake.set,
        )

        def new_settings(settings: DaemonSettings) -> None:
            writes.max_size = settings.commit_max_size
            executor.replace_settings(settings)

        self._settings_listeners[:] = [new_settings]
        tick_task = asyncio.create_task(
            self._tick_loop(daemon.id, writes, marks, executor), name="fusillade-ticks"
        )
        loops = {
            asyncio.create_task(self._heartbeat_loop(daemon.id), name="fusillade-heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="fusillade-maintenance"),
            asyncio.create_task(self._queue_upkeep_loop(), name="fusillade-queue-upkeep"),
            asyncio.create_task(self._cancellation_loop(daemon.id), name="fusillade-cancellation"),
            asyncio.create_task(self._purge_loop(), name="fusillade-purge"),
        }
        stop_task = asyncio.create_task(self._stop.wait(), name="fusillade-stop")
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait({*loops, tick_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stop_task}:
                failure = task.exception()
                if failure is None and not self._stop.is_set():
                    failure = RuntimeError(f"The daemon's {task.get_name()} loop returned.")
                if failure is not None:
                    break
        finally:
            stop_task.cancel()
            await self._shut_down(daemon.id, writes, tick_task, loops, failure=failure)
        if failure is not None:
            if not isinstance(failure, DaemonFenced):
                logger.critical("Daemon %s stopped: a loop crashed.", daemon.id, exc_info=failure)
            raise failure

    # -------------------------------------------------------------------------------------- the tick loop

    async def _tick_loop(
        self, daemon_id: ids.DaemonId, writes: PendingWrites, marks: ProcessingMarks, executor: RequestExecutor
    ) -> None:
        """The daemon's link to the queue. Each tick is one trip to the database that commits the state writes
        that came in (group commit) and then claims requests for the slots that are free; up to
        `ticks_in_flight` ticks run at once, so that slots freed during one tick's round trip are claimed for
        by the next without waiting for it. The loop runs until the daemon stops and its last writes are
        committed."""
        ticks: set[asyncio.Task[None]] = set()
        backoff = self._backoff()
        idle = True
        last_tick = 0.0
        try:
            while True:
                # Under load, let writes and freed slots gather a moment: fewer, larger trips cost less per
                # request (a commit and a claim each), and the loop serves the calls meanwhile.
                gap = self._settings.min_tick_interval.total_seconds() - (time.monotonic() - last_tick)
                if gap > 0 and not self._stop.is_set():
                    await asyncio.sleep(gap)
                for tick in [tick for tick in ticks if tick.done()]:
                    ticks.discard(tick)
                    tick.result()  # a fenced daemon, or a bug: the loop stops with it
                stopping = self._stop.is_set()
                if stopping and not writes and not self._tasks and not ticks:
                    return
                self._wake.clear()
                if len(ticks) >= self._settings.ticks_in_flight or (self._uncertain and ticks):
                    await self._wake.wait()  # a tick ending sets it
                    continue
                if self._uncertain and not stopping:
                    # A failed claim may have committed after all, leaving requests claimed in our name that no
                    # task runs. Give those back before claiming again (no other claim is under way now).
                    try:
                        await self._release_orphans(daemon_id, writes)
                    except errors.StorageError as exc:
                        await self._database_failed("claim", exc, backoff)
                        continue
                    self._uncertain = False
                try:
                    claim = None if stopping else await self._claim_order()
                except errors.StorageError as exc:
                    await self._database_failed("claim", exc, backoff)
                    continue
                next_mark = marks.submit_due(
                    time.monotonic(), self._settings.processing_mark_delay.total_seconds()
                )
                if claim is None and not writes.ready():
                    idle_poll = None if stopping else self._settings.idle_poll_interval
                    await self._sleep_until_woken(idle_poll, next_mark)
                    idle = True
                    continue
                if idle and claim is None and not stopping:
                    await self._gather_writes(writes)
                idle = False
                last_tick = time.monotonic()
                tick = asyncio.create_task(
                    self._tick(daemon_id, writes, writes.take_group(), claim, executor, backoff, stopping)
                )
                tick.add_done_callback(self._tick_ended)
                ticks.add(tick)
        finally:
            await _cancel_all(list(ticks))

    def _tick_ended(self, tick: asyncio.Task[None]) -> None:
        self._wake.set()

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
        started = time.perf_counter()
        try:
            report, claimed = await self._storage.apply_writes_and_claim(
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
            raise DaemonFenced(
                f"Daemon {daemon_id} was declared dead by the others; it stops so that requests they took "
                "over are not sent twice."
            ) from exc
        except errors.StorageError as exc:
            writes.put_back(group)
            if claim is not None:
                self._lanes.unreserve(claim.capacities)
                self._uncertain = True
                self._claim_wanted = True
            # While stopping, the stop event cannot cut the pause short: keep backing off.
            task = "commit" if group else "claim"
            await self._database_failed(task, exc, backoff, interruptible=not stopping)
            return
        except BaseException:
            # Cancelled at shutdown, or a bug: the writes go back (to be committed, or answered when the
            # stopping daemon abandons them), so that nothing waits on them forever.
            writes.put_back(group)
            if claim is not None:
                self._lanes.unreserve(claim.capacities)
            raise
        backoff.succeeded()
        elapsed = time.perf_counter() - started
        if group:
            self._committed(writes, group, report, elapsed)
        if claim is not None:
            self._claimed(claim, claimed, elapsed, executor)

    def _committed(self, writes: PendingWrites, group: Group, report: models.WriteReport, elapsed: float) -> None:
        self.metrics.commit_duration.observe(elapsed)
        self.metrics.commit_size.observe(len(group))
        if refused := writes.settle(group, report):
            self.metrics.write_conflicts.inc(refused)

    def _claimed(
        self,
        claim: _ClaimOrder,
        claimed: list[models.ClaimedRequest],
        elapsed: float,
        executor: RequestExecutor,
    ) -> None:
        self.metrics.claim_duration.observe(elapsed)
        self.metrics.claim_size.observe(len(claimed))
        self._lanes.unreserve(claim.capacities)
        # Claim again at once if this claim was cut by its limit (more may be waiting); otherwise when woken: a
        # slot freed, new work, a due retry, a lane resuming, or the idle timer.
        if len(claimed) >= claim.limit:
            self._claim_wanted = True
        for request in claimed:
            self._start(request, executor)

    async def _claim_order(self) -> _ClaimOrder | None:
        """What to claim now, or None (nothing wanted, or no free slot)."""
        if not self._claim_wanted:
            return None
        if self._lanes.has_default and (
            self._discover
            or time.monotonic() - self._discovered_at >= self._settings.idle_poll_interval.total_seconds()
        ):
            self._lanes.learn(await self._storage.pending_models())
            self._discover = False
            self._discovered_at = time.monotonic()
        self._claim_wanted = False
        capacities = self._lanes.capacities(time.monotonic())
        if not capacities:
            return None
        self._lanes.reserve(capacities)  # until the claim's answer: another tick must not claim these slots
        return _ClaimOrder(
            capacities,
            min(self._settings.claim_batch_size, sum(capacity.free for capacity in capacities)),
            self._lanes.owners_in_flight() or None,
        )

    async def _gather_writes(self, writes: PendingWrites) -> None:
        """After an idle spell, let other writes join the first one for up to `commit_max_delay`; a slot
        freed (a claim to make) or a stop ends the wait."""
        deadline = time.monotonic() + self._settings.commit_max_delay.total_seconds()
        while len(writes) < writes.max_size and not self._claim_wanted and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _release_orphans(self, daemon_id: ids.DaemonId, writes: PendingWrites) -> None:
        busy = writes.waiting_for()
        orphans = [
            request_id
            for request_id in await self._storage.held_requests(daemon_id)
            if request_id not in self._tasks and request_id not in busy
        ]
        if orphans:
            logger.warning("Releasing %d requests claimed by a claim whose answer was lost.", len(orphans))
            for request_id in orphans:
                writes.submit(models.Release(request_id))

    def _start(self, request: models.ClaimedRequest, executor: RequestExecutor) -> None:
        self._lanes.started(request)
        settings = self._settings
        headers = {"traceparent": traceparent(request)} if settings.traceparent else None
        self._tasks[request.id] = asyncio.create_task(self._run_request(request, executor, headers))

    async def _run_request(
        self, request: models.ClaimedRequest, executor: RequestExecutor, headers: dict[str, str] | None
    ) -> None:
        try:
            if self._settings.batch_metadata_headers:
                headers = {**(await self._headers_for(request)), **(headers or {})}
            await executor.execute(
                request, headers=headers, abort_reason=functools.partial(self._abort_reasons.get, request.id)
            )
        except Exception:
            logger.exception("Request %s: its task failed.", ids.request_wire(request.id))
        finally:
            self._finished(request)

    def _finished(self, request: models.ClaimedRequest) -> None:
        self._tasks.pop(request.id, None)
        self._abort_reasons.pop(request.id, None)
        self._lanes.finished(request)
        self._claim_wanted = True
        self._wake.set()

    async def _sleep_until_woken(self, idle: timedelta | None, next_mark: float | None) -> None:
        now = time.monotonic()
        deadlines = [now + idle.total_seconds()] if idle is not None else []
        if next_mark is not None:
            deadlines.append(next_mark)
        if self._retries_due:
            deadlines.append(self._retries_due[0])
        if (resume := self._lanes.next_resume()) is not None:
            deadlines.append(resume)
        wait_for = max(0.0, min(deadlines) - now) if deadlines else None
        try:
            async with asyncio.timeout(wait_for):
                await self._wake.wait()
        except TimeoutError:
            self._claim_wanted = True  # a timer ran out: the idle poll, a due retry or a lane resuming
        now = time.monotonic()
        while self._retries_due and self._retries_due[0] <= now:
            heapq.heappop(self._retries_due)
            self._claim_wanted = True

    def _want_claim(self) -> None:
        self._claim_wanted = True
        self._wake.set()

    def _retry_scheduled(self, retry_at: datetime) -> None:
        due = time.monotonic() + max(0.0, (retry_at - self._clock.now()).total_seconds())
        heapq.heappush(self._retries_due, due)
        if self._retries_due[0] == due:
            self._wake.set()

    async def _headers_for(self, request: models.ClaimedRequest) -> dict[str, str]:
        headers = self._batch_headers.get(request.batch_id)
        if headers is None:
            try:
                batch = await self._storage.get_batch(request.batch_id, owner=models.ALL_OWNERS)
            except errors.FusilladeError:
                return {}
            metadata = batch.metadata or {}
            headers = {
                f"x-fusillade-batch-{key.lower()}": value
                for key in self._settings.batch_metadata_headers
                if (value := metadata.get(key)) is not None and _header_safe(value)
            }
            if len(self._batch_headers) >= _BATCH_HEADER_CACHE:
                self._batch_headers.clear()
            self._batch_headers[request.batch_id] = headers
        return headers

    # ------------------------------------------------------------------------------------------ side loops

    async def _heartbeat_loop(self, daemon_id: ids.DaemonId) -> None:
        while True:
            interval = self._settings.heartbeat_interval.total_seconds()
            await asyncio.sleep(interval)
            try:
                await self._storage.heartbeat(daemon_id, in_flight=len(self._tasks))
            except (errors.StateConflict, errors.NotFound) as exc:
                raise DaemonFenced(
                    f"Daemon {daemon_id} was declared dead (its heartbeat was older than "
                    f"{self._settings.stale_after}); it stops so that its reclaimed requests are not sent twice."
                ) from exc
            except errors.StorageError as exc:
                self.metrics.database_errors.labels("heartbeat").inc()
                logger.warning("Heartbeat failed (%s); trying again in %.1f s.", exc, interval)

    async def _maintenance_loop(self) -> None:
        backoff = self._backoff()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.maintenance_interval.total_seconds()):
                    await self._maintenance_wake.wait()
            self._maintenance_wake.clear()
            try:
                reclaimed = await self._storage.reclaim_requests(stale_after=self._settings.stale_after)
                if reclaimed:
                    self.metrics.reclaimed.inc(reclaimed)
                    logger.warning("Reclaimed %d requests of dead or silent daemons.", reclaimed)
                    self._want_claim()
                await self._storage.expire_batches(grace=self._settings.expiry_grace)
                while len(await self._storage.finalize_batches(limit=100)) == 100:
                    pass
            except errors.StorageError as exc:
                await self._database_failed("maintenance", exc, backoff)
                continue
            backoff.succeeded()

    async def _queue_upkeep_loop(self) -> None:
        """The queue's upkeep (`maintain_queue`: PostgreSQL's vacuum of the requests table, SQLite's WAL
        checkpoint) on the maintenance interval, in a loop of its own: a vacuum may take minutes on a big table,
        or hang until its own time limit on a network gone silent, and reclaiming, expiry and finalizing must
        not wait for it."""
        backoff = self._backoff()
        while True:
            await asyncio.sleep(self._settings.maintenance_interval.total_seconds())
            try:
                await self._storage.maintain_queue()
            except errors.StorageError as exc:
                await self._database_failed("queue upkeep", exc, backoff)
                continue
            backoff.succeeded()

    async def _cancellation_loop(self, daemon_id: ids.DaemonId) -> None:
        backoff = self._backoff()
        while True:
            await asyncio.sleep(self._settings.cancellation_poll_interval.total_seconds())
            if not self._tasks:
                continue
            try:
                cancelling = await self._storage.cancelling_requests(daemon_id)
            except errors.StorageError as exc:
                await self._database_failed("cancellation", exc, backoff)
                continue
            backoff.succeeded()
            for request_id in cancelling:
                self._abort(request_id, AbortReason.CANCELLED)
            if cancelling:
                self._maintenance_wake.set()  # finalize the cancelled batches soon

    async def _purge_loop(self) -> None:
        backoff = self._backoff()
        while True:
            interval = self._settings.purge_interval
            await asyncio.sleep(interval.total_seconds() if interval is not None else 60.0)
            if self._settings.purge_interval is None:  # switched off by a reload
                continue
            throttle = self._settings.purge_throttle.total_seconds()
            try:
                purged = await self._storage.purge_deleted(limit=self._settings.purge_batch_size)
                while purged:
                    self.metrics.rows_purged.inc(purged)
                    await asyncio.sleep(throttle)
                    purged = await self._storage.purge_deleted(limit=self._settings.purge_batch_size)
            except errors.StorageError as exc:
                await self._database_failed("purge", exc, backoff)
                continue
            backoff.succeeded()

    # ---------------------------------------------------------------------------------------------- stop

    def _abort(self, request_id: ids.RequestId, reason: AbortReason) -> None:
        task = self._tasks.get(request_id)
        if task is not None and request_id not in self._abort_reasons:
            self._abort_reasons[request_id] = reason
            task.cancel()

    async def _shut_down(
        self,
        daemon_id: ids.DaemonId,
        writes: PendingWrites,
        tick_task: asyncio.Task[None],
        loops: set[asyncio.Task[None]],
        *,
        failure: BaseException | None,
    ) -> None:
        self._stop.set()
        self._wake.set()
        fenced = isinstance(failure, DaemonFenced)
        if fenced or tick_task.done():
            # Fenced: the database would refuse our writes. Tick loop dead: nobody would commit them.
            writes.abandon()
        if fenced:
            for request_id in list(self._tasks):
                self._abort(request_id, AbortReason.FENCED)
        elif self._tasks:
            logger.info(
                "Stopping: waiting up to %s for %d calls in flight.",
                self._settings.shutdown_grace,
                len(self._tasks),
            )
            await asyncio.wait(list(self._tasks.values()), timeout=self._settings.shutdown_grace.total_seconds())
            for request_id in list(self._tasks):
                self._abort(request_id, AbortReason.SHUTDOWN)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        await _cancel_all(list(loops))
        if not tick_task.done():  # it commits the last writes, then returns
            try:
                async with asyncio.timeout(self._settings.shutdown_grace.total_seconds()):
                    await asyncio.shield(tick_task)
            except TimeoutError:
                writes.abandon()
                logger.error(
                    "Stopping: the database did not take the last state writes in time; those requests "
                    "will be reclaimed after the heartbeat threshold."
                )
                await _cancel_all([tick_task])
        if not fenced:
            try:
                await self._storage.mark_daemon_dead(daemon_id)
            except errors.StorageError as exc:
                logger.error(
                    "Stopping: could not mark daemon %s dead (%s); others will reclaim its requests after "
                    "the heartbeat threshold.",
                    daemon_id,
                    exc,
                )
        logger.info("Daemon %s stopped.", daemon_id)

    # ------------------------------------------------------------------------------------------- helpers

    async def _register(self) -> models.Daemon:
        return await self._storage.register_daemon(
            models.DaemonInfo(
                hostname=socket.gethostname(),
                pid=os.getpid(),
                version=self._version,
                config={"models": {model: route.concurrency for model, route in self._routes_items()}},
            )
        )

    def _routes_items(self) -> list[tuple[str, Route]]:
        return [(model, route) for model in self._lanes.model_names if (route := self._lanes.route(model))]

    async def _retrying(self, task: str, call: Callable[[], Awaitable[T]]) -> T | None:
        backoff = self._backoff()
        while not self._stop.is_set():
            try:
                return await call()
            except errors.StorageError as exc:
                await self._database_failed(task, exc, backoff)
        return None

    async def _database_failed(
        self, task: str, exc: errors.StorageError, backoff: Backoff, *, interruptible: bool = True
    ) -> None:
        self.metrics.database_errors.labels(task).inc()
        delay = backoff.failed()
        log = logger.warning if backoff.failures <= 3 else logger.error
        log("Database call of the %s loop failed (%s); retrying in %.2f s.", task, exc, delay)
        if not interruptible:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()

    def _backoff(self) -> Backoff:
        return Backoff(cap=self._settings.database_backoff_max.total_seconds())


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _header_safe(value: str) -> bool:
    return len(value) <= _HEADER_SAFE_METADATA and value.isprintable() and value.isascii()


async def run_until_signalled(daemon: Daemon) -> None:
    """Run the daemon; SIGTERM or SIGINT asks it to stop in order (the CLI's `fusillade daemon`)."""
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, daemon.stop)
    try:
        await daemon.run()
    finally:
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signal_number)


def traceparent(request: models.ClaimedRequest) -> str:
    """A W3C trace context header: version 00, the request id as trace id, a random span id, sampled."""
    return f"00-{request.id.hex}-{secrets.token_hex(8)}-01"
