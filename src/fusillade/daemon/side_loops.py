"""The daemon's side loops, each on its own interval of the daemon's clock and each typed against the storage
role it uses:

| loop | every | what |
|---|---|---|
| heartbeat | `heartbeat_interval` | `DaemonRegistry.heartbeat`; refused: declared dead (`DaemonFenced`) |
| maintenance | `maintenance_interval`, or sooner when woken | reclaim dead daemons' requests, expire, finalize |
| queue upkeep | `maintenance_interval` | `RequestQueue.maintain_queue` (vacuum, WAL checkpoint) |
| cancellation | `cancellation_poll_interval` | abort the calls of batches being cancelled |
| purge | `purge_interval` (None: off) | drop deleted batches and files, `purge_batch_size` rows at a time |

Each runs in a task of its own, so that a slow one (a vacuum of a big table may take minutes) holds up no other.
A failing database call backs off and retries (`LoopContext.database_failed`); anything else stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from fusillade import errors
from fusillade.daemon.calls import Calls
from fusillade.daemon.executor import AbortReason
from fusillade.daemon.loops import DaemonFenced, LoopContext
from fusillade.domain import ids
from fusillade.storage.base import BatchStore, DaemonRegistry, RequestQueue, RetentionStore

logger = logging.getLogger(__name__)

PURGE_OFF_POLL_SECONDS = 60.0
"""With purging off, how often the purge loop looks whether a reload switched it on."""
FINALIZE_PAGE = 100


class SideLoops:
    def __init__(
        self,
        *,
        registry: DaemonRegistry,
        batches: BatchStore,
        queue: RequestQueue,
        retention: RetentionStore,
        calls: Calls,
        limits: Callable[[], Mapping[str, int]],
        context: LoopContext,
        on_reclaimed: Callable[[], None],
    ) -> None:
        self._registry = registry
        self._batches = batches
        self._queue = queue
        self._retention = retention
        self._calls = calls
        self._limits = limits
        """The lanes' limits now, reported with every heartbeat."""
        self._context = context
        self._on_reclaimed = on_reclaimed
        self._maintenance_wake = asyncio.Event()

    def start(self, daemon_id: ids.DaemonId) -> set[asyncio.Task[None]]:
        """Start every side loop of one life of the daemon; they run until cancelled (or crash)."""
        return {
            asyncio.create_task(self._heartbeat(daemon_id), name="fusillade-heartbeat"),
            asyncio.create_task(self._maintenance(), name="fusillade-maintenance"),
            asyncio.create_task(self._queue_upkeep(), name="fusillade-queue-upkeep"),
            asyncio.create_task(self._cancellation(daemon_id), name="fusillade-cancellation"),
            asyncio.create_task(self._purge(), name="fusillade-purge"),
        }

    async def _heartbeat(self, daemon_id: ids.DaemonId) -> None:
        context = self._context
        while True:
            interval = context.settings.heartbeat_interval.total_seconds()
            await context.clock.sleep(interval)
            try:
                await self._registry.heartbeat(daemon_id, in_flight=len(self._calls), limits=self._limits())
            except (errors.StateConflict, errors.NotFound) as exc:
                raise DaemonFenced(
                    f"Daemon {daemon_id} was declared dead (its heartbeat was older than "
                    f"{context.settings.stale_after}); it stops so that its reclaimed requests are not sent "
                    "twice."
                ) from exc
            except errors.StorageError as exc:
                context.metrics.database_errors.labels("heartbeat").inc()
                logger.warning("Heartbeat failed (%s); trying again in %.1f s.", exc, interval)

    async def _maintenance(self) -> None:
        """Reclaim the requests of daemons declared dead (their heartbeat older than `stale_after`), expire the
        batches past their window, finalize the batches that are done."""
        context = self._context
        backoff = context.backoff()
        while True:
            with contextlib.suppress(TimeoutError):
                await context.clock.wait_for(
                    self._maintenance_wake.wait(), context.settings.maintenance_interval.total_seconds()
                )
            self._maintenance_wake.clear()
            try:
                reclaimed = await self._registry.reclaim_requests(stale_after=context.settings.stale_after)
                if reclaimed:
                    context.metrics.reclaimed.inc(reclaimed)
                    logger.warning("Reclaimed %d requests of dead or silent daemons.", reclaimed)
                    self._on_reclaimed()
                await self._batches.expire_batches(grace=context.settings.expiry_grace)
                while len(await self._batches.finalize_batches(limit=FINALIZE_PAGE)) == FINALIZE_PAGE:
                    pass
            except errors.StorageError as exc:
                await context.database_failed("maintenance", exc, backoff)
                continue
            backoff.succeeded()

    async def _queue_upkeep(self) -> None:
        """The queue's upkeep on the maintenance interval, in a loop of its own: a vacuum may take minutes on a
        big table, or hang until its own time limit on a network gone silent, and reclaiming, expiry and
        finalizing must not wait for it."""
        context = self._context
        backoff = context.backoff()
        while True:
            await context.clock.sleep(context.settings.maintenance_interval.total_seconds())
            try:
                await self._queue.maintain_queue()
            except errors.StorageError as exc:
                await context.database_failed("queue upkeep", exc, backoff)
                continue
            backoff.succeeded()

    async def _cancellation(self, daemon_id: ids.DaemonId) -> None:
        context = self._context
        backoff = context.backoff()
        while True:
            await context.clock.sleep(context.settings.cancellation_poll_interval.total_seconds())
            if not self._calls:
                continue
            try:
                cancelling = await self._queue.cancelling_requests(daemon_id)
            except errors.StorageError as exc:
                await context.database_failed("cancellation", exc, backoff)
                continue
            backoff.succeeded()
            for request_id in cancelling:
                self._calls.abort(request_id, AbortReason.CANCELLED)
            if cancelling:
                self._maintenance_wake.set()  # finalize the cancelled batches soon

    async def _purge(self) -> None:
        context = self._context
        backoff = context.backoff()
        while True:
            interval = context.settings.purge_interval
            await context.clock.sleep(interval.total_seconds() if interval is not None else PURGE_OFF_POLL_SECONDS)
            if context.settings.purge_interval is None:  # switched off by a reload
                continue
            throttle = context.settings.purge_throttle.total_seconds()
            try:
                purged = await self._retention.purge_deleted(limit=context.settings.purge_batch_size)
                while purged:
                    context.metrics.rows_purged.inc(purged)
                    await context.clock.sleep(throttle)
                    purged = await self._retention.purge_deleted(limit=context.settings.purge_batch_size)
            except errors.StorageError as exc:
                await context.database_failed("purge", exc, backoff)
                continue
            backoff.succeeded()
