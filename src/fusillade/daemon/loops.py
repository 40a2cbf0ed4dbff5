"""What every loop of one daemon shares (`LoopContext`): the knobs in force, the clock, the metrics, the stop
event of its current life, and the rule for a failing database call: log it, count it, back off, go on.

A loop never dies of its database: each failure pauses it for a backoff that doubles up to
`database_backoff_max` (cut short by a stop), and the first success resets the pause. A loop that raises
anything else is a bug, and the daemon stops loudly with it (`Daemon.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fusillade import errors
from fusillade.clock import Clock
from fusillade.daemon.backoff import Backoff
from fusillade.daemon.settings import DaemonSettings
from fusillade.metrics import DaemonMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class DaemonFenced(errors.FusilladeError):
    """This daemon was declared dead (its heartbeat went stale) and its requests may have been reclaimed by
    another daemon; it stopped without writing anything more."""


class LoopContext:
    """The state the daemon's parts share. `settings` is replaced on a reload; each loop reads it afresh at its
    next round, so that a new knob applies without a restart."""

    def __init__(self, settings: DaemonSettings, clock: Clock, metrics: DaemonMetrics) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.stop = asyncio.Event()
        """Set to end the current life: by `Daemon.stop()`, or by a fencing (then cleared for the next life)."""

    def backoff(self) -> Backoff:
        """A fresh backoff for one loop's database calls."""
        return Backoff(cap=self.settings.database_backoff_max.total_seconds())

    async def database_failed(
        self, task: str, exc: errors.StorageError, backoff: Backoff, *, interruptible: bool = True
    ) -> None:
        """Log and count a failed database call of the `task` loop, then pause for the backoff's next delay
        (cut short by a stop, unless not `interruptible`: a stopping tick must keep backing off)."""
        self.metrics.database_errors.labels(task).inc()
        delay = backoff.failed()
        log = logger.warning if backoff.failures <= 3 else logger.error
        log("Database call of the %s loop failed (%s); retrying in %.2f s.", task, exc, delay)
        if not interruptible:
            await self.clock.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await self.clock.wait_for(self.stop.wait(), delay)

    async def retrying(self, task: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call`'s result, retried with backoff while the database fails; None if the daemon stops first."""
        backoff = self.backoff()
        while not self.stop.is_set():
            try:
                return await call()
            except errors.StorageError as exc:
                await self.database_failed(task, exc, backoff)
        return None


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them to end, whatever they end with (they are being given up on)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
