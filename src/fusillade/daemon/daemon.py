"""The daemon: its parts, and how it starts and stops.

```
 register ──► tick scheduler (ticks.py) ──► one task per claimed request (calls.py): call the upstream
                 │  each tick: ONE trip to the database: commit the       (executor.py), submit the state
                 │  writes that came in, then claim for the free slots    write (pending_writes.py)
 side loops (side_loops.py): heartbeat · maintenance (reclaim dead daemons' work, expire, finalize) ·
                 queue upkeep · cancellation · purge
 shared (loops.py): the settings in force, the clock, the metrics, the stop event; headers.py: extra headers
```
`Daemon` composes the parts and owns their life: `run`, `stop`, the orderly shutdown, and the live reloads
(`replace_routes`, `replace_settings`). Every part takes its time from the daemon's `Clock` (`clock.py`), so a
test on a `ManualClock` decides when backoffs end, heartbeats go stale and batches expire.

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
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping

from fusillade import errors
from fusillade.clock import Clock, SystemClock
from fusillade.daemon.calls import Calls
from fusillade.daemon.executor import AbortReason, ProcessingMarks, RequestExecutor, Upstream
from fusillade.daemon.headers import BatchHeaders, traceparent
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.loops import DaemonFenced, LoopContext, cancel_all
from fusillade.daemon.pending_writes import PendingWrites
from fusillade.daemon.pools import EndpointPools
from fusillade.daemon.settings import DaemonSettings
from fusillade.daemon.side_loops import SideLoops
from fusillade.daemon.ticks import TickScheduler
from fusillade.domain import ids, models
from fusillade.metrics import DEFAULT_ROUTE_LABEL, DaemonMetrics
from fusillade.storage.base import Storage
from fusillade.upstream.routes import Route

__all__ = ["Daemon", "DaemonFenced", "run_until_signalled", "traceparent"]

logger = logging.getLogger(__name__)


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
        """`clock` (default: the system's) gives the daemon all its time: timers, sleeps and the time limits of
        its waits; pass the storage's own clock, so that both see the same time."""
        self._storage = storage
        self._client = client
        self.metrics = metrics or DaemonMetrics()
        self._context = LoopContext(settings or DaemonSettings(), clock or SystemClock(), self.metrics)
        self._version = version
        self._lanes = Lanes(routes, default_route)
        self.metrics.use_routes(routes)
        self.metrics.count_in_flight(self._lanes.models_in_flight)
        self.metrics.read_limits(self._lanes.limits)
        self._pools = EndpointPools()
        self.metrics.read_endpoints(self._pools.in_flight, self._pools.ejected)
        self._daemon_id: ids.DaemonId | None = None
        self._stop_requested = False
        self._calls = Calls(
            self._lanes, BatchHeaders(storage, self._context), self._context, on_finished=self._slot_freed
        )
        self._ticks = TickScheduler(storage, self._lanes, self._calls, self._context)
        self._side_loops = SideLoops(
            registry=storage,
            batches=storage,
            queue=storage,
            retention=storage,
            calls=self._calls,
            limits=self._lanes.limits,
            context=self._context,
            on_reclaimed=self._ticks.want_claim,
        )
        self._settings_listeners: list[Callable[[DaemonSettings], None]] = []

    # ------------------------------------------------------------------------------------- public surface

    @property
    def daemon_id(self) -> ids.DaemonId | None:
        """Set once the daemon registered."""
        return self._daemon_id

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def notify_work(self) -> None:
        """New work may be claimable (a batch was created or retried in this process): claim now."""
        self._ticks.want_claim(discover=True)

    def replace_routes(self, routes: Mapping[str, Route], default_route: Route | None = None) -> None:
        """New routing table (limits, upstreams, the route of models without their own); applies to the next
        claim and the next calls."""
        self._lanes.replace_routes(routes, default_route)
        self.metrics.use_routes(routes)
        pooled = {model for model, route in routes.items() if len(route.base_urls) > 1}
        if default_route is not None and len(default_route.base_urls) > 1:
            pooled.add(DEFAULT_ROUTE_LABEL)
        self._pools.forget_others(pooled)
        self._ticks.want_claim(discover=True)

    def replace_settings(self, settings: DaemonSettings) -> None:
        """New knobs (a configuration reload): each loop uses them from its next round."""
        self._context.settings = settings
        for listener in self._settings_listeners:
            listener(settings)
        self._ticks.want_claim()

    def stop(self) -> None:
        """Ask for an orderly stop (safe to call from a signal handler via `loop.call_soon_threadsafe`)."""
        self._stop_requested = True
        self._context.stop.set()
        self._ticks.wake()

    async def run(self) -> None:
        """Run until `stop()`; raises a crashed loop's exception after stopping. Declared dead by the others
        (fenced), it registers again under a new id and goes on."""
        while not self._stop_requested:
            daemon = await self._context.retrying("register", self._register)
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
                self._context.stop.clear()
                self._ticks.new_life()

    # --------------------------------------------------------------------------------------- one life

    async def _run_as(self, daemon: models.DaemonRecord) -> None:
        """One life of the daemon, under one id: until `stop()`, a crash, or `DaemonFenced`."""
        self._daemon_id = daemon.id
        logger.info("Daemon %s started (models: %s).", daemon.id, ", ".join(self._lanes.model_names) or "none")
        context = self._context
        writes = PendingWrites(max_size=context.settings.commit_max_size, on_arrival=self._ticks.wake)
        marks = ProcessingMarks(writes)
        executor = RequestExecutor(
            client=self._client,
            lanes=self._lanes,
            writes=writes,
            marks=marks,
            settings=context.settings,
            clock=context.clock,
            metrics=self.metrics,
            on_retry_scheduled=self._ticks.retry_scheduled,
            on_lane_paused=self._ticks.wake,
            pools=self._pools,
        )

        def new_settings(settings: DaemonSettings) -> None:
            writes.max_size = settings.commit_max_size
            executor.replace_settings(settings)

        self._settings_listeners[:] = [new_settings]
        tick_task = asyncio.create_task(
            self._ticks.run(daemon.id, writes, marks, executor), name="fusillade-ticks"
        )
        loops = self._side_loops.start(daemon.id)
        stop_task = asyncio.create_task(context.stop.wait(), name="fusillade-stop")
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait({*loops, tick_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stop_task}:
                failure = task.exception()
                if failure is None and not context.stop.is_set():
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

    async def _shut_down(
        self,
        daemon_id: ids.DaemonId,
        writes: PendingWrites,
        tick_task: asyncio.Task[None],
        loops: set[asyncio.Task[None]],
        *,
        failure: BaseException | None,
    ) -> None:
        context = self._context
        grace = context.settings.shutdown_grace
        context.stop.set()
        self._ticks.wake()
        fenced = isinstance(failure, DaemonFenced)
        if fenced or tick_task.done():
            # Fenced: the database would refuse our writes. Tick loop dead: nobody would commit them.
            writes.abandon()
        if fenced:
            self._calls.abort_all(AbortReason.FENCED)
        elif self._calls:
            logger.info("Stopping: waiting up to %s for %d calls in flight.", grace, len(self._calls))
            await self._calls.wait(grace.total_seconds())
            self._calls.abort_all(AbortReason.SHUTDOWN)
        await self._calls.wait()
        await cancel_all(list(loops))
        if not tick_task.done():  # it commits the last writes, then returns
            try:
                await context.clock.wait_for(asyncio.shield(tick_task), grace.total_seconds())
            except TimeoutError:
                writes.abandon()
                logger.error(
                    "Stopping: the database did not take the last state writes in time; those requests "
                    "will be reclaimed after the heartbeat threshold."
                )
                await cancel_all([tick_task])
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

    def _slot_freed(self) -> None:
        self._ticks.want_claim()

    async def _register(self) -> models.DaemonRecord:
        routes = [(model, route) for model in self._lanes.model_names if (route := self._lanes.route(model))]
        return await self._storage.register_daemon(
            models.DaemonInfo(
                hostname=socket.gethostname(),
                pid=os.getpid(),
                version=self._version,
                config={"models": {model: route.concurrency for model, route in routes}},
            )
        )


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
