"""Where fusillade reads the time and waits for it, so that tests can move time by hand.

Two protocols, one per kind of user:
- `WallClock`: the date and time (`now`). Storage needs only this: it stamps rows and compares stamps.
- `Clock`: a `WallClock` that also measures intervals (`monotonic`) and waits (`sleep`, `wait_for`). The daemon
  takes all its time from one: its timers (backoff, due retries, 429 pauses, processing marks, idle polls) and
  its waits for events with a time limit.

Two implementations, each of both protocols:
- `SystemClock`: the real thing (`datetime.now`, `time.monotonic`, `asyncio.sleep`, `asyncio.timeout`).
- `ManualClock`: moves only when told (`advance`, `run_for`); a sleeper wakes when the clock reaches its
  deadline, whatever the real time. A test on it runs a daemon's hours in milliseconds, and never flakes on a
  loaded machine because a real timer fired late.

What stays on real time by design: durations measured for metrics (they report the real cost of a database
trip or an upstream call, and decide nothing), and the upstream client's own timers (they guard a socket).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

T = TypeVar("T")

_SETTLE_ROUNDS = 8
"""How many turns of the event loop `ManualClock.run_for` gives woken sleepers before it moves on: enough for a
continuation to reach its next wait when that wait is on the clock or an event (not for database I/O, which
takes real time: tests poll for outcomes)."""


class WallClock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class Clock(WallClock, Protocol):
    def monotonic(self) -> float:
        """Seconds since an arbitrary origin; never goes back, moves with `now()` on a manual clock."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time; 0 (or less) only yields to the event loop."""
        ...

    async def wait_for(self, awaitable: Awaitable[T], within: float | None) -> T:
        """Await `awaitable` for at most `within` seconds of this clock's time (None: no limit). When the time
        runs out first, the awaitable is cancelled and `TimeoutError` raised (as `asyncio.wait_for` does)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait_for(self, awaitable: Awaitable[T], within: float | None) -> T:
        async with asyncio.timeout(None if within is None else max(0.0, within)):
            return await awaitable


@dataclass(order=True, slots=True)
class _Alarm:
    """A wait on a manual clock: `ring` is called once the clock reaches `deadline`, unless cancelled first."""

    deadline: timedelta
    """Since the clock's start (exact to the microsecond, so that repeated steps add up without drift)."""
    sequence: int
    """Ties ring in the order the waits began."""
    ring: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class ManualClock:
    """A clock that only moves when told to (for tests and simulations). Wall and monotonic time move together;
    `set` alone jumps the wall time (as a wall clock may), leaving intervals and sleepers alone."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._elapsed = timedelta(0)
        self._alarms: list[_Alarm] = []
        self._sequence = itertools.count()

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        """Seconds since the clock was made."""
        return self._elapsed.total_seconds()

    def set(self, moment: datetime) -> None:
        self._now = moment

    @property
    def sleepers(self) -> int:
        """How many waits are pending on this clock (a test can wait for a loop to reach its next sleep)."""
        return sum(not alarm.cancelled for alarm in self._alarms)

    def next_wake(self) -> timedelta | None:
        """How long until the earliest pending wait ends (zero if it is due), if any wait is pending."""
        while self._alarms and self._alarms[0].cancelled:
            heapq.heappop(self._alarms)
        return max(timedelta(0), self._alarms[0].deadline - self._elapsed) if self._alarms else None

    def advance(self, delta: timedelta) -> None:
        """Move time on by `delta` at once. The waits that end by then are woken in deadline order; they run
        when the caller next yields to the event loop (see `run_for` to let each run at its own deadline)."""
        self._move_by(_forward(delta))
        self._ring_due()

    async def run_for(self, delta: timedelta) -> None:
        """Let `delta` pass in steps: the clock stops at each pending wait's deadline, wakes it, and lets the
        event loop run its continuation before moving on, so that a loop which sleeps again within `delta` is
        woken again within it, as on a real clock."""
        remaining = _forward(delta)
        while (wake := self.next_wake()) is not None and wake <= remaining:
            self._move_by(wake)
            remaining -= wake
            self._ring_due()
            await _settle()
        self._move_by(remaining)
        await _settle()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        alarm = self._alarm(seconds, functools.partial(_wake, woken))
        try:
            await woken
        finally:
            alarm.cancelled = True

    async def wait_for(self, awaitable: Awaitable[T], within: float | None) -> T:
        if within is None:
            return await awaitable
        # The awaitable runs in this task (as under `SystemClock`); when the clock reaches the deadline, the
        # scope expires at once and cancels it. The alarm is cancelled on the way out, so that it never
        # touches a scope already left.
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as scope:
            if within <= 0:
                scope.reschedule(loop.time())
                return await awaitable
            alarm = self._alarm(within, lambda: scope.reschedule(loop.time()))
            try:
                return await awaitable
            finally:
                alarm.cancelled = True

    def _alarm(self, seconds: float, ring: Callable[[], None]) -> _Alarm:
        alarm = _Alarm(self._elapsed + timedelta(seconds=seconds), next(self._sequence), ring)
        heapq.heappush(self._alarms, alarm)
        return alarm

    def _move_by(self, delta: timedelta) -> None:
        self._elapsed += delta
        self._now += delta

    def _ring_due(self) -> None:
        while self._alarms and self._alarms[0].deadline <= self._elapsed:
            alarm = heapq.heappop(self._alarms)
            if not alarm.cancelled:
                alarm.cancelled = True
                alarm.ring()


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _forward(delta: timedelta) -> timedelta:
    if delta < timedelta(0):
        raise ValueError(f"A manual clock moves forward only, not by {delta}.")
    return delta


async def _settle() -> None:
    for _ in range(_SETTLE_ROUNDS):
        await asyncio.sleep(0)
