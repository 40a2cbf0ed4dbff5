"""Group commit: the state writes of many concurrent request tasks go to the database together, one transaction
per short tick, through `RequestQueue.apply_writes`.

A task submits a write and may await its future, which resolves once the transaction holding it committed.
When the writer was idle, the first write waits up to `max_delay` for others to join; writes that arrive while a
transaction runs go together in the next one at once, so groups grow with the load and no write waits long.

Two writes for one request in one group are merged when the later one accepts the earlier one's target state
as its own start (a `MarkProcessing` followed by `Complete`, `Fail`, `Cancel` or `Release` becomes the later
write alone: the queue accepts those from `claimed`); otherwise the later write waits for the next group.

A failing transaction is retried with backoff, never dropped: a state write acknowledged to nobody must not be
lost. If a commit went through but its acknowledgement did not reach us, the retry sees the rows already in the
target state; such a refusal of a retried group counts as applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fusillade import errors
from fusillade.daemon.backoff import Backoff
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import ids, models, states
from fusillade.metrics import DaemonMetrics
from fusillade.storage.base import RequestQueue

logger = logging.getLogger(__name__)

_FOLDS_MARK_PROCESSING = (models.Complete, models.Fail, models.Cancel, models.Release)
_TARGET_STATES: dict[type[object], states.RequestState] = {
    models.Complete: states.RequestState.COMPLETED,
    models.Fail: states.RequestState.FAILED,
    models.Cancel: states.RequestState.CANCELED,
}


@dataclass(frozen=True, slots=True)
class WriteResult:
    applied: bool
    state: states.RequestState | None = None
    """For a refused write, the request's state at the time (None if it no longer exists or the writer
    stopped before the write could be made)."""


_ABANDONED = WriteResult(False)


@dataclass(slots=True)
class _Entry:
    write: models.RequestWrite
    futures: list[asyncio.Future[WriteResult]]


class GroupCommitWriter:
    def __init__(
        self,
        queue: RequestQueue,
        daemon_id: ids.DaemonId,
        *,
        max_delay: float,
        max_size: int,
        metrics: DaemonMetrics,
        backoff: Backoff,
    ) -> None:
        self._queue = queue
        self._daemon_id = daemon_id
        self._max_delay = max_delay
        self._max_size = max_size
        self._metrics = metrics
        self._backoff = backoff
        self._waiting: list[_Entry] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._abandoned = False

    def replace_settings(self, settings: DaemonSettings) -> None:
        self._max_delay = settings.commit_max_delay.total_seconds()
        self._max_size = settings.commit_max_size

    @property
    def backlog(self) -> int:
        return len(self._waiting)

    def submit(self, write: models.RequestWrite) -> asyncio.Future[WriteResult]:
        """Queue a write; the future resolves when it committed (or was refused)."""
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        if self._abandoned:
            future.set_result(_ABANDONED)
            return future
        self._waiting.append(_Entry(write, [future]))
        self._arrived.set()
        return future

    async def close(self) -> None:
        """Commit what is waiting, then let `run` return."""
        self._closing = True
        self._arrived.set()

    def abandon(self) -> None:
        """Drop every waiting write (the daemon was fenced: the database would refuse them anyway)."""
        self._abandoned = True
        self._closing = True
        for entry in self._waiting:
            _resolve(entry.futures, _ABANDONED)
        self._waiting.clear()
        self._arrived.set()

    async def run(self) -> None:
        while True:
            if not self._waiting:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                if not self._closing and len(self._waiting) < self._max_size:
                    await self._gather_more()
                continue
            group, deferred = self._take_group()
            await self._commit(group)
            self._waiting[:0] = deferred

    async def _gather_more(self) -> None:
        deadline = time.monotonic() + self._max_delay
        while len(self._waiting) < self._max_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _take_group(self) -> tuple[dict[ids.RequestId, _Entry], list[_Entry]]:
        group: dict[ids.RequestId, _Entry] = {}
        deferred: list[_Entry] = []
        taken = 0
        for entry in self._waiting:
            if len(group) >= self._max_size:
                deferred.append(entry)
                continue
            taken += 1
            request_id = entry.write.request_id
            earlier = group.get(request_id)
            if earlier is None:
                group[request_id] = entry
            elif isinstance(earlier.write, models.MarkProcessing) and isinstance(
                entry.write, _FOLDS_MARK_PROCESSING
            ):
                group[request_id] = _Entry(entry.write, earlier.futures + entry.futures)
            else:
                deferred.append(entry)
        self._waiting = []
        return group, deferred

    async def _commit(self, group: dict[ids.RequestId, _Entry]) -> None:
        writes = [entry.write for entry in group.values()]
        retried = False
        while True:
            if self._abandoned:
                for entry in group.values():
                    _resolve(entry.futures, _ABANDONED)
                return
            started = time.perf_counter()
            try:
                report = await self._queue.apply_writes(self._daemon_id, writes)
            except errors.StorageError as exc:
                self._metrics.database_errors.labels("commit").inc()
                delay = self._backoff.failed()
                logger.warning(
                    "Group commit of %d writes failed (%s); retrying in %.1f s.", len(writes), exc, delay
                )
                retried = True
                await asyncio.sleep(delay)
                continue
            break
        self._backoff.succeeded()
        self._metrics.commit_duration.observe(time.perf_counter() - started)
        self._metrics.commit_size.observe(len(writes))
        conflicts = 0
        for request_id, entry in group.items():
            if request_id in report.applied:
                result = WriteResult(True)
            elif request_id in report.conflicts:
                state = report.conflicts[request_id]
                if retried and _TARGET_STATES.get(type(entry.write)) == state:
                    result = WriteResult(True, state)
                else:
                    result = WriteResult(False, state)
                    conflicts += 1
            else:
                result = WriteResult(False)
                conflicts += 1
            _resolve(entry.futures, result)
        if conflicts:
            self._metrics.write_conflicts.inc(conflicts)


def _resolve(futures: list[asyncio.Future[WriteResult]], result: WriteResult) -> None:
    for future in futures:
        if not future.done():
            future.set_result(result)
