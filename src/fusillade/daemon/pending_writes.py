"""Group commit: the state writes of many concurrent request tasks wait here and go to the database together,
one group per tick of the daemon's tick scheduler (`daemon.ticks.TickScheduler`, through
`RequestQueue.apply_writes_and_claim`).

A task submits a write with a callback (or awaits `write`); it runs once the transaction holding the write
committed, or the write was refused, and is given the write too (so that one callback made ahead of time can
serve every write of a kind, with nothing allocated per write). A task does not wait for its write to end: its
call is over, its slot is free, and the write is committed with the others of its tick.

Two writes for one request in one group are merged into the later one when the transition table allows it
(`transitions.FOLDS`: the later write applies from every state the earlier one does and from the state it
leaves, as `Complete`, `Fail`, `Cancel` and `Release` do after a `MarkProcessing`); otherwise the later write
waits for the next group.

A group whose transaction failed goes back in front of the queue, never dropped: a state write acknowledged to
nobody must not be lost. If a commit went through but its acknowledgement did not reach us, the retry sees the
rows already in the target state; such a refusal of a retried write counts as applied when that target is final
(`completed`, `failed`, `canceled`: nothing moves a request on from there but a user's retry). A request found
back in pending or processing may have got there by a reclaim and another daemon's claim: that refusal stands.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass

from fusillade.domain import ids, models, states, transitions

_FINAL_TARGETS: dict[type[models.RequestWrite], states.RequestState] = {
    kind: transition.target
    for kind, transition in transitions.DAEMON_WRITES.items()
    if transition.target.is_terminal
}


@dataclass(frozen=True, slots=True)
class WriteResult:
    applied: bool
    state: states.RequestState | None = None
    """For a refused write, the request's state at the time (None if it no longer exists or the daemon
    stopped before the write could be made)."""


ABANDONED = WriteResult(False)
_APPLIED = WriteResult(True)

Done = Callable[[WriteResult, models.RequestWrite], None]
"""Told what came of a write, and given the write as it went to the database (for a write folded into a later
one, that later write)."""


@dataclass(slots=True)
class _Entry:
    write: models.RequestWrite
    done: list[Done]
    retried: bool = False
    """Its transaction failed once: the commit may have gone through without our hearing of it."""


@dataclass(slots=True)
class Group:
    """The writes of one transaction, at most one per request."""

    entries: dict[ids.RequestId, _Entry]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def writes(self) -> list[models.RequestWrite]:
        return [entry.write for entry in self.entries.values()]


class PendingWrites:
    def __init__(self, *, max_size: int, on_arrival: Callable[[], None]) -> None:
        self.max_size = max_size
        self._on_arrival = on_arrival
        self._waiting: list[_Entry] = []
        self._committing: set[ids.RequestId] = set()
        """Requests with a write in a group under way: their next write waits for its answer."""
        self._abandoned = False

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, write: models.RequestWrite, done: Done | None = None) -> None:
        """Queue a write; `done` is called with what came of it."""
        if self._abandoned:
            if done is not None:
                done(ABANDONED, write)
            return
        self._waiting.append(_Entry(write, [done] if done is not None else []))
        self._on_arrival()

    async def write(self, write: models.RequestWrite) -> WriteResult:
        """Queue a write and wait until it committed (or was refused)."""
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self.submit(write, functools.partial(_resolve, future))
        return await future

    def waiting_for(self) -> set[ids.RequestId]:
        """The requests with a write not yet committed."""
        return {entry.write.request_id for entry in self._waiting} | self._committing

    def ready(self) -> bool:
        """Whether `take_group` would take a write now."""
        committing = self._committing
        return any(entry.write.request_id not in committing for entry in self._waiting)

    def abandon(self) -> None:
        """Drop every waiting write and refuse new ones (the daemon was fenced, or its queue loop died: the
        database would refuse them, or nobody would commit them)."""
        self._abandoned = True
        self._committing.clear()
        waiting, self._waiting = self._waiting, []
        for entry in waiting:
            _call(entry, ABANDONED)

    def take_group(self) -> Group:
        """The next group: the oldest waiting writes, at most `max_size`, one per request, none for a request
        whose previous write is in a group under way (it waits for that group's answer)."""
        group: dict[ids.RequestId, _Entry] = {}
        deferred: list[_Entry] = []
        committing = self._committing
        for entry in self._waiting:
            request_id = entry.write.request_id
            if len(group) >= self.max_size or request_id in committing:
                deferred.append(entry)
                continue
            earlier = group.get(request_id)
            if earlier is None:
                group[request_id] = entry
            elif (type(earlier.write), type(entry.write)) in transitions.FOLDS:
                retried = earlier.retried or entry.retried
                group[request_id] = _Entry(entry.write, earlier.done + entry.done, retried)
            else:
                deferred.append(entry)
        self._waiting = deferred
        committing.update(group)
        return Group(group)

    def put_back(self, group: Group) -> None:
        """A group whose transaction failed: in front of the queue again, to be retried."""
        self._committing.difference_update(group.entries)
        if self._abandoned:
            for entry in group.entries.values():
                _call(entry, ABANDONED)
            return
        for entry in group.entries.values():
            entry.retried = True
        self._waiting[:0] = group.entries.values()

    def settle(self, group: Group, report: models.WriteReport) -> int:
        """Tell each write of a committed group what came of it; returns how many were refused."""
        self._committing.difference_update(group.entries)
        refused = 0
        for request_id, entry in group.entries.items():
            if request_id in report.applied:
                result = _APPLIED
            elif request_id in report.conflicts:
                state = report.conflicts[request_id]
                if entry.retried and _FINAL_TARGETS.get(type(entry.write)) == state:
                    result = WriteResult(True, state)
                else:
                    result = WriteResult(False, state)
                    refused += 1
            else:
                result = WriteResult(False)
                refused += 1
            _call(entry, result)
        return refused


def _resolve(future: asyncio.Future[WriteResult], result: WriteResult, _write: models.RequestWrite) -> None:
    if not future.done():
        future.set_result(result)


def _call(entry: _Entry, result: WriteResult) -> None:
    for callback in entry.done:
        callback(result, entry.write)
