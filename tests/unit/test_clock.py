"""The clocks: a manual clock moves only when told, wakes its sleepers in deadline order and times out waits on
its own time; the system clock does the real thing."""

from __future__ import annotations

import ast
import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fusillade import clock as clocks

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


async def test_a_manual_clock_stands_still_until_advanced_and_moves_wall_and_monotonic_time_together() -> None:
    clock = clocks.ManualClock(START)
    before = clock.monotonic()
    await asyncio.sleep(0)
    assert (clock.now(), clock.monotonic()) == (START, before)

    clock.advance(timedelta(seconds=2.5))

    assert clock.now() == START + timedelta(seconds=2.5)
    assert clock.monotonic() - before == 2.5


async def test_setting_the_wall_time_leaves_intervals_alone() -> None:
    clock = clocks.ManualClock(START)
    clock.set(START - timedelta(hours=1))  # a wall clock may jump back
    assert clock.now() == START - timedelta(hours=1)
    assert clock.monotonic() == 0.0
    clock.advance(SECOND)
    assert clock.now() == START - timedelta(hours=1) + SECOND


def test_a_manual_clock_never_goes_back() -> None:
    with pytest.raises(ValueError, match="forward"):
        clocks.ManualClock().advance(-SECOND)


async def test_a_sleeper_wakes_only_once_the_clock_reaches_its_deadline() -> None:
    clock = clocks.ManualClock()
    sleeper = asyncio.create_task(clock.sleep(5))
    await asyncio.sleep(0)  # it starts sleeping
    await clock.run_for(timedelta(seconds=4.75))
    assert not sleeper.done()
    assert clock.sleepers == 1
    await clock.run_for(timedelta(seconds=0.25))
    assert sleeper.done()
    assert clock.sleepers == 0


async def test_sleepers_wake_in_deadline_order_each_at_its_own_time() -> None:
    clock = clocks.ManualClock()
    woken: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woken.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper(name, seconds)) for name, seconds in (("c", 3), ("a", 1), ("b", 2))]
    await asyncio.sleep(0)  # they start sleeping
    await clock.run_for(timedelta(seconds=10))

    assert woken == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert all(task.done() for task in tasks)
    assert clock.monotonic() == 10.0


async def test_a_loop_that_sleeps_again_wakes_again_within_one_run() -> None:
    clock = clocks.ManualClock()
    rounds: list[float] = []

    async def every_second() -> None:
        while True:
            await clock.sleep(1)
            rounds.append(clock.monotonic())

    task = asyncio.create_task(every_second())
    await asyncio.sleep(0)
    await clock.run_for(timedelta(seconds=3.5))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert rounds == [1.0, 2.0, 3.0]
    assert clock.sleepers == 0  # the cancelled sleep left nothing behind


async def test_advance_at_once_wakes_every_due_sleeper_in_deadline_order() -> None:
    clock = clocks.ManualClock()
    order: list[int] = []

    async def sleeper(seconds: int) -> None:
        await clock.sleep(seconds)
        order.append(seconds)

    tasks = [asyncio.create_task(sleeper(seconds)) for seconds in (2, 1, 9)]
    await asyncio.sleep(0)
    clock.advance(timedelta(seconds=5))
    await asyncio.gather(*tasks[:2])

    assert order == [1, 2]
    assert not tasks[2].done()
    tasks[2].cancel()


async def test_a_sleep_of_zero_only_yields() -> None:
    clock = clocks.ManualClock()
    other_ran = asyncio.Event()

    async def other() -> None:
        other_ran.set()

    asyncio.get_running_loop().call_soon(asyncio.ensure_future, other())
    await clock.sleep(0)
    await clock.sleep(-1)
    await asyncio.sleep(0)
    assert other_ran.is_set()
    assert clock.monotonic() == 0.0
    assert clock.sleepers == 0


async def test_wait_for_returns_what_arrives_before_the_timeout() -> None:
    clock = clocks.ManualClock()
    event = asyncio.Event()
    waiter = asyncio.create_task(clock.wait_for(event.wait(), within=10))
    await asyncio.sleep(0)
    await clock.run_for(timedelta(seconds=9))
    assert not waiter.done()
    event.set()
    assert await waiter is True
    assert clock.sleepers == 0
    await clock.run_for(timedelta(seconds=5))  # the spent alarm does nothing


async def test_wait_for_times_out_on_the_clock_and_cancels_what_it_waited_for() -> None:
    clock = clocks.ManualClock()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiter = asyncio.create_task(clock.wait_for(forever(), within=3))
    await asyncio.sleep(0)
    await clock.run_for(timedelta(seconds=2.75))
    assert not waiter.done()
    await clock.run_for(timedelta(seconds=0.25))
    with pytest.raises(TimeoutError):
        await waiter
    assert cancelled.is_set()


async def test_wait_for_without_a_timeout_waits_as_long_as_it_takes() -> None:
    clock = clocks.ManualClock()
    event = asyncio.Event()
    waiter = asyncio.create_task(clock.wait_for(event.wait(), within=None))
    await asyncio.sleep(0)
    await clock.run_for(timedelta(days=365))
    assert not waiter.done()
    assert clock.sleepers == 0
    event.set()
    assert await waiter is True


async def test_wait_for_with_no_time_left_returns_only_what_is_ready() -> None:
    clock = clocks.ManualClock()
    ready = asyncio.Event()
    ready.set()
    assert await clock.wait_for(ready.wait(), within=0) is True
    with pytest.raises(TimeoutError):
        await clock.wait_for(asyncio.Event().wait(), within=0)


async def test_a_cancelled_wait_for_leaves_no_alarm_behind() -> None:
    clock = clocks.ManualClock()
    waiter = asyncio.create_task(clock.wait_for(asyncio.Event().wait(), within=5))
    await asyncio.sleep(0)
    assert clock.sleepers == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert clock.sleepers == 0
    assert clock.next_wake() is None


async def test_the_system_clock_sleeps_and_times_out_in_real_time() -> None:
    clock = clocks.SystemClock()
    started = clock.monotonic()
    await clock.sleep(0.02)
    assert clock.monotonic() - started >= 0.02
    with pytest.raises(TimeoutError):
        await clock.wait_for(asyncio.Event().wait(), within=0.01)
    ready = asyncio.Event()
    ready.set()
    assert await clock.wait_for(ready.wait(), within=None) is True
    assert abs(clock.now() - datetime.now(UTC)) < SECOND


# ------------------------------------------------------------------------------ the daemon reads no other time

DAEMON_SOURCE = Path(clocks.__file__).resolve().parent / "daemon"
REAL_TIME_CALLS = {
    "time.monotonic",
    "time.monotonic_ns",
    "time.time",
    "time.time_ns",
    "time.sleep",
    "datetime.now",
    "datetime.utcnow",
    "asyncio.wait_for",
    "asyncio.timeout",
    "asyncio.timeout_at",
}
"""Real time the daemon must take from its `Clock` instead (`time.perf_counter` stays: it measures durations for
the metrics and decides nothing)."""
REAL_TIME_IMPORTS = {name.rpartition(".")[2] for name in REAL_TIME_CALLS if not name.startswith("datetime")}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _real_time_reads(source: str) -> list[str]:
    """The places in `source` that read or wait on real time, as `line: call`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "asyncio"):
            found += [
                f"{node.lineno}: from {node.module} import {alias.name}"
                for alias in node.names
                if alias.name in REAL_TIME_IMPORTS | {"sleep"}
            ]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        sleeps_for_real = name == "asyncio.sleep" and not (
            len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and node.args[0].value == 0
        )
        waits_for_real = name == "asyncio.wait" and any(keyword.arg == "timeout" for keyword in node.keywords)
        if name in REAL_TIME_CALLS or sleeps_for_real or waits_for_real or name.endswith(".call_later"):
            found.append(f"{node.lineno}: {name}")
    return found


def test_the_daemon_takes_all_its_time_from_its_clock() -> None:
    offenders = [
        f"{path.name}:{place}"
        for path in sorted(DAEMON_SOURCE.glob("*.py"))
        for place in _real_time_reads(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "source",
    [
        "import time\ntime.monotonic()",
        "from time import monotonic",
        "import asyncio\nasyncio.sleep(0.5)",
        "import asyncio\nasyncio.sleep(delay)",
        "import asyncio\nasyncio.wait_for(event.wait(), 1)",
        "import asyncio\nasyncio.timeout(2)",
        "import asyncio\nasyncio.wait(tasks, timeout=3)",
        "from datetime import datetime\ndatetime.now()",
        "loop.call_later(1, callback)",
    ],
)
def test_the_scan_finds_each_kind_of_real_time_read(source: str) -> None:
    assert _real_time_reads(source) != []


def test_the_scan_lets_a_bare_yield_and_metric_durations_pass() -> None:
    assert (
        _real_time_reads("import asyncio, time\nasyncio.sleep(0)\ntime.perf_counter()\nasyncio.wait(tasks)") == []
    )


def test_the_scan_lets_other_imports_pass() -> None:
    assert _real_time_reads("from asyncio import Event\nfrom time import perf_counter") == []
