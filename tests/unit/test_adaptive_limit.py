"""The adaptive limit, alone and driven by a simulated upstream (simulated time: no I/O, no clock).

The simulation sends calls whenever fewer than the limit are in flight (a backlog that never runs dry), to an
upstream of `capacity` slots that each take `service` seconds: above capacity it either refuses at once (429)
or queues the call first come first served.
"""

from __future__ import annotations

import heapq
import random
import statistics
from dataclasses import dataclass, field

import pytest

from fusillade.domain.adaptive_limit import BELOW_KNEE, OVERLOAD_CUT, AdaptiveLimit


@dataclass
class Simulated:
    calls: int = 0
    refused: int = 0
    succeeded: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)
    """(when it ended, latency) of each success."""
    limits: list[tuple[float, int]] = field(default_factory=list)


def simulate(
    limit: AdaptiveLimit,
    *,
    capacity: int,
    service: float,
    mode: str,
    duration: float,
    jitter: float = 0.0,
    seed: int = 0,
) -> Simulated:
    rng = random.Random(seed)
    result = Simulated()
    events: list[tuple[float, int, str, float, int]] = []  # (time, order, kind, sent_at, in_flight at send)
    order = 0
    now = 0.0
    in_flight = 0
    slot_free_at = [0.0] * capacity  # queue mode: when each slot is next free (first come first served)
    serving = 0  # refuse mode: calls in a slot

    def send() -> None:
        nonlocal order, in_flight, serving
        in_flight += 1
        result.calls += 1
        took = service * (1 + rng.uniform(-jitter, jitter))
        if mode == "refuse":
            if serving >= capacity:
                heapq.heappush(events, (now + 0.001, order, "refused", now, in_flight))
            else:
                serving += 1
                heapq.heappush(events, (now + took, order, "served", now, in_flight))
        else:
            slot = min(range(capacity), key=slot_free_at.__getitem__)
            start = max(now, slot_free_at[slot])
            slot_free_at[slot] = start + took
            heapq.heappush(events, (start + took, order, "served", now, in_flight))
        order += 1

    while now < duration:
        while in_flight < limit.limit:
            send()
        now, _, kind, sent_at, sent_in_flight = heapq.heappop(events)
        in_flight -= 1
        if kind == "refused":
            result.refused += 1
            limit.overloaded(sent_at=sent_at, now=now)
        else:
            if mode == "refuse":
                serving -= 1
            result.succeeded += 1
            result.latencies.append((now, now - sent_at))
            limit.succeeded(sent_at=sent_at, in_flight=sent_in_flight, latency=now - sent_at, now=now)
        result.limits.append((now, limit.limit))
    return result


def after(pairs: list[tuple[float, float]], start: float) -> list[float]:
    return [value for when, value in pairs if when >= start]


# ------------------------------------------------------------------------------------------ closed loop


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_an_upstream_that_refuses_above_its_capacity_is_used_near_it_with_few_refusals(jitter: float) -> None:
    limit = AdaptiveLimit(1, 64)
    run = simulate(limit, capacity=8, service=0.1, mode="refuse", duration=30, jitter=jitter)
    ideal = 8 / 0.1 * 30
    assert run.succeeded >= 0.85 * ideal, (run.succeeded, ideal)
    assert run.refused <= 0.10 * run.calls, (run.refused, run.calls)
    steady = after([(when, float(value)) for when, value in run.limits], 5.0)
    assert 6 <= statistics.median(steady) <= 10


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_an_upstream_that_queues_keeps_its_latency_near_the_unloaded_one(jitter: float) -> None:
    limit = AdaptiveLimit(1, 64)
    run = simulate(limit, capacity=8, service=0.1, mode="queue", duration=30, jitter=jitter)
    assert run.succeeded >= 0.85 * 8 / 0.1 * 30
    latencies = after(run.latencies, 5.0)
    assert statistics.mean(latencies) <= 0.1 * 1.3, statistics.mean(latencies)
    assert limit.baseline is not None and limit.baseline == pytest.approx(0.1, rel=0.1)
    steady = after([(when, float(value)) for when, value in run.limits], 5.0)
    assert 7 <= statistics.median(steady) <= 12


def test_a_limit_that_is_not_in_use_does_not_grow() -> None:
    limit = AdaptiveLimit(2, 64)
    for step in range(1000):
        limit.succeeded(sent_at=step, in_flight=1, latency=0.1, now=step + 0.1)
    assert limit.limit == 2


def test_the_limit_grows_to_its_ceiling_while_calls_succeed_at_the_same_latency() -> None:
    limit = AdaptiveLimit(1, 16)
    for step in range(200):
        limit.succeeded(sent_at=step, in_flight=limit.limit, latency=0.1, now=step + 0.1)
    assert limit.limit == 16


# ----------------------------------------------------------------------------------------------- cuts


def test_a_refusal_cuts_the_limit_once_per_round_trip() -> None:
    limit = AdaptiveLimit(1, 64)
    for step in range(40):
        limit.succeeded(sent_at=step / 100, in_flight=limit.limit, latency=0.1, now=step / 100 + 0.1)
    before = limit.limit
    assert before > 10
    assert limit.overloaded(sent_at=1.0, now=1.1)
    cut = limit.limit
    assert cut in (int(before * OVERLOAD_CUT), int(before * OVERLOAD_CUT) + 1)
    # Refusals of calls sent before that cut say nothing about the cut limit.
    assert not limit.overloaded(sent_at=1.05, now=1.11)
    assert limit.limit == cut
    assert limit.overloaded(sent_at=1.12, now=1.2)
    assert limit.limit < cut


def test_cuts_stop_at_the_floor() -> None:
    limit = AdaptiveLimit(3, 10)
    for step in range(20):
        limit.overloaded(sent_at=float(step), now=step + 0.5)
    assert limit.limit == 3


def test_a_queueing_upstream_cuts_the_limit_to_what_it_serves_unqueued() -> None:
    limit = AdaptiveLimit(1, 64)
    for step in range(30):  # unloaded: 100 ms; the limit grows in slow start
        limit.succeeded(sent_at=step / 10, in_flight=limit.limit, latency=0.1, now=step / 10 + 0.1)
    grown = limit.limit
    assert grown > 20
    cut = False
    for step in range(2 * grown):  # the calls now wait as long as they are served: latency doubled
        cut = limit.succeeded(sent_at=10 + step / 100, in_flight=grown, latency=0.2, now=10.2 + step / 100)
        if cut:
            break
    assert cut
    # Little's law: twice the latency at the same rate, up to twice too many in flight (the window mixes in
    # the last calls at 100 ms): cut by less than half, to below where the latency rose.
    assert grown // 2 <= limit.limit < grown * BELOW_KNEE


def test_new_bounds_keep_the_limit_found_within_them() -> None:
    limit = AdaptiveLimit(1, 64)
    for step in range(12):
        limit.succeeded(sent_at=step, in_flight=limit.limit, latency=0.1, now=step + 0.1)
    found = limit.limit
    assert 4 < found <= 13
    limit.bound(2, 100)
    assert limit.limit == found
    limit.bound(1, 4)
    assert limit.limit == 4
    limit.bound(8, 20)
    assert limit.limit == 8
    with pytest.raises(ValueError, match="floor <= ceiling"):
        limit.bound(5, 4)
