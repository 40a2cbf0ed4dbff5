"""The calls in flight: one task per claimed request, from its start (the tick that claimed it) until its state
write is submitted. The tick scheduler starts them; the cancellation loop and the shutdown abort them, saying
why first (`AbortReason`: the executor decides from it what to write); the heartbeat reports how many run.

A task that ends, however it ends, frees its model's slot and tells the tick scheduler (`on_finished`), which
claims for the slot at its next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from fusillade.daemon.executor import AbortReason, RequestExecutor
from fusillade.daemon.headers import BatchHeaders
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.loops import LoopContext
from fusillade.domain import ids, models

logger = logging.getLogger(__name__)


class Calls:
    def __init__(
        self, lanes: Lanes, headers: BatchHeaders, context: LoopContext, *, on_finished: Callable[[], None]
    ) -> None:
        self._lanes = lanes
        self._headers = headers
        self._context = context
        self._on_finished = on_finished
        self._tasks: dict[ids.RequestId, asyncio.Task[None]] = {}
        self._abort_reasons: dict[ids.RequestId, AbortReason] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._tasks

    def start(self, request: models.ClaimedRequest, executor: RequestExecutor) -> None:
        """Start the request's call (its slot counts as taken from now on)."""
        self._lanes.started(request)
        abort_reason = functools.partial(self._abort_reasons.get, request.id)
        finished = functools.partial(self._ended, request)
        if self._headers.wanted():
            call = self._with_headers(request, executor, abort_reason, finished)
        else:
            # The executor's coroutine is the task itself: no coroutine around it, as each level between the
            # task and aiohttp costs at every suspension of the call.
            call = executor.execute(request, headers=None, abort_reason=abort_reason, finished=finished)
        self._tasks[request.id] = asyncio.create_task(call)

    def abort(self, request_id: ids.RequestId, reason: AbortReason) -> None:
        """Cancel the request's call, if it runs and was not aborted already; `reason` tells its task why."""
        task = self._tasks.get(request_id)
        if task is not None and request_id not in self._abort_reasons:
            self._abort_reasons[request_id] = reason
            task.cancel()

    def abort_all(self, reason: AbortReason) -> None:
        for request_id in list(self._tasks):
            self.abort(request_id, reason)

    async def wait(self, within: float | None = None) -> None:
        """Until every call has ended, or `within` seconds passed on the clock (None: however long)."""
        if not self._tasks:
            return
        with contextlib.suppress(TimeoutError):
            await self._context.clock.wait_for(asyncio.wait(list(self._tasks.values())), within)

    async def _with_headers(
        self,
        request: models.ClaimedRequest,
        executor: RequestExecutor,
        abort_reason: Callable[[], AbortReason | None],
        finished: Callable[[], None],
    ) -> None:
        try:
            headers = await self._headers.for_call(request)
        except Exception:
            logger.exception("Request %s: its extra headers failed.", ids.request_wire(request.id))
            finished()
            return
        except BaseException:
            finished()
            raise
        await executor.execute(request, headers=headers, abort_reason=abort_reason, finished=finished)

    def _ended(self, request: models.ClaimedRequest) -> None:
        """The call ended, however it ended (called by its task, before the task ends): free its slot."""
        self._tasks.pop(request.id, None)
        if self._abort_reasons:
            self._abort_reasons.pop(request.id, None)
        self._lanes.finished(request)
        self._on_finished()
