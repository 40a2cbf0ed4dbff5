"""Retry policy (`domain.retry`): backoff, give-up decisions, retriable statuses, Retry-After."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.domain import retry

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
FAR = NOW + timedelta(days=1)
MICROSECOND = timedelta(microseconds=1)

no_jitter = retry.RetryPolicy(jitter=0)


# ---------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"base_delay": timedelta(seconds=-1)}, "base_delay"),
        ({"factor": 0.5}, "factor"),
        ({"factor": float("inf")}, "factor"),
        ({"factor": float("nan")}, "factor"),
        ({"max_delay": timedelta(milliseconds=500)}, "max_delay"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"stop_before_deadline": timedelta(seconds=-1)}, "stop_before_deadline"),
    ],
)
def test_policy_rejects_nonsense(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"RetryPolicy.{field}"):
        retry.RetryPolicy(**options)


def test_policy_defaults() -> None:
    policy = retry.RetryPolicy()
    assert (policy.base_delay, policy.factor, policy.max_delay) == (
        timedelta(seconds=1),
        2.0,
        timedelta(seconds=60),
    )
    assert (policy.jitter, policy.max_attempts, policy.stop_before_deadline) == (0.2, 10, timedelta(0))


# --------------------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("attempt", "seconds"), [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (7, 60), (10_000, 60), (10**12, 60)]
)
def test_backoff_doubles_up_to_the_cap(attempt: int, seconds: float) -> None:
    assert retry.backoff_delay(no_jitter, attempt, random=0.3) == timedelta(seconds=seconds)


def test_jitter_spreads_the_delay_both_ways() -> None:
    policy = retry.RetryPolicy(jitter=0.2)
    assert retry.backoff_delay(policy, 2, random=0.0) == timedelta(seconds=3.2)
    assert retry.backoff_delay(policy, 2, random=0.5) == timedelta(seconds=4)
    assert retry.backoff_delay(policy, 2, random=0.75) == timedelta(seconds=4.4)


def test_jitter_never_goes_past_the_cap() -> None:
    policy = retry.RetryPolicy(jitter=0.5)
    assert retry.backoff_delay(policy, 20, random=0.999) == timedelta(seconds=60)
    assert retry.backoff_delay(policy, 20, random=0.0) == timedelta(seconds=30)


def test_zero_base_delay_means_no_delay() -> None:
    policy = retry.RetryPolicy(base_delay=timedelta(0), jitter=1)
    assert retry.backoff_delay(policy, 10**9, random=0.9) == timedelta(0)


@pytest.mark.parametrize(("attempt", "random"), [(-1, 0.5), (0, 1.0), (0, -0.1), (0, float("nan"))])
def test_backoff_rejects_bad_arguments(attempt: int, random: float) -> None:
    with pytest.raises(ValueError, match=r"attempt|random"):
        retry.backoff_delay(retry.RetryPolicy(), attempt, random=random)


policies = st.builds(
    lambda base, factor, extra, jitter: retry.RetryPolicy(
        base_delay=timedelta(milliseconds=base),
        factor=factor,
        max_delay=timedelta(milliseconds=base + extra),
        jitter=jitter,
    ),
    st.integers(0, 10_000),
    st.floats(1, 10),
    st.integers(0, 600_000),
    st.floats(0, 1),
)
randoms = st.floats(0, 1, exclude_max=True)


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(0, 2_000), randoms)
def test_backoff_stays_within_its_bounds(policy: retry.RetryPolicy, attempt: int, random: float) -> None:
    delay = retry.backoff_delay(policy, attempt, random=random)
    if policy.base_delay:
        exponent = attempt * math.log(policy.factor) + math.log(policy.base_delay.total_seconds())
        grown = timedelta(seconds=math.exp(min(exponent, math.log(policy.max_delay.total_seconds()))))
    else:
        grown = timedelta(0)
    unjittered = min(grown, policy.max_delay)
    assert timedelta(0) <= delay <= policy.max_delay
    assert (
        unjittered * (1 - policy.jitter) - MICROSECOND <= delay <= unjittered * (1 + policy.jitter) + MICROSECOND
    )


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(0, 200), randoms)
def test_backoff_without_jitter_never_shrinks(policy: retry.RetryPolicy, attempt: int, random: float) -> None:
    steady = retry.RetryPolicy(
        base_delay=policy.base_delay, factor=policy.factor, max_delay=policy.max_delay, jitter=0
    )
    assert retry.backoff_delay(steady, attempt, random=random) <= retry.backoff_delay(
        steady, attempt + 1, random=random
    )


# -------------------------------------------------------------------------------------- decisions


def test_decide_retries_after_the_backoff() -> None:
    decision = retry.decide(no_jitter, attempt=2, now=NOW, deadline=FAR, random=0.5)
    assert decision == retry.RetryDecision(NOW + timedelta(seconds=4), "retry")


def test_retry_after_is_a_floor_not_a_ceiling() -> None:
    longer = retry.decide(no_jitter, attempt=0, now=NOW, deadline=FAR, retry_after=timedelta(seconds=30), random=0)
    shorter = retry.decide(no_jitter, attempt=3, now=NOW, deadline=FAR, retry_after=timedelta(seconds=1), random=0)
    assert longer.retry_at == NOW + timedelta(seconds=30)
    assert shorter.retry_at == NOW + timedelta(seconds=8)


def test_retry_after_may_exceed_max_delay() -> None:
    decision = retry.decide(no_jitter, attempt=0, now=NOW, deadline=FAR, retry_after=timedelta(hours=1), random=0)
    assert decision.retry_at == NOW + timedelta(hours=1)


def test_max_attempts_counts_the_first_attempt() -> None:
    policy = retry.RetryPolicy(max_attempts=3)
    assert retry.decide(policy, attempt=1, now=NOW, deadline=FAR, random=0).reason == "retry"
    assert retry.decide(policy, attempt=2, now=NOW, deadline=FAR, random=0) == retry.RetryDecision(
        None, "max_attempts"
    )


def test_one_attempt_means_no_retry() -> None:
    policy = retry.RetryPolicy(max_attempts=1)
    assert retry.decide(policy, attempt=0, now=NOW, deadline=FAR, random=0).reason == "max_attempts"


def test_unlimited_attempts_stop_only_at_the_deadline() -> None:
    policy = retry.RetryPolicy(max_attempts=None, jitter=0)
    assert retry.decide(policy, attempt=10_000, now=NOW, deadline=FAR, random=0).reason == "retry"
    assert retry.decide(policy, attempt=10_000, now=NOW, deadline=NOW + timedelta(seconds=60), random=0) == (
        retry.RetryDecision(None, "deadline")
    )


def test_give_up_when_the_retry_would_start_at_or_after_the_deadline() -> None:
    assert retry.decide(no_jitter, attempt=2, now=NOW, deadline=NOW + timedelta(seconds=4), random=0).reason == (
        "deadline"
    )
    assert retry.decide(
        no_jitter, attempt=2, now=NOW, deadline=NOW + timedelta(seconds=4, microseconds=1), random=0
    ).reason == ("retry")


def test_stop_before_deadline_moves_the_cut_off_earlier() -> None:
    policy = retry.RetryPolicy(jitter=0, stop_before_deadline=timedelta(seconds=10))
    deadline = NOW + timedelta(seconds=12)
    assert retry.decide(policy, attempt=0, now=NOW, deadline=deadline, random=0).reason == "retry"
    assert retry.decide(policy, attempt=1, now=NOW, deadline=deadline, random=0).reason == "deadline"


def test_a_huge_retry_after_gives_up_instead_of_overflowing() -> None:
    decision = retry.decide(
        no_jitter, attempt=0, now=NOW, deadline=FAR, retry_after=timedelta(days=999_999_999), random=0
    )
    assert decision == retry.RetryDecision(None, "deadline")


def test_a_deadline_already_past_gives_up() -> None:
    decision = retry.decide(no_jitter, attempt=0, now=NOW, deadline=NOW - timedelta(hours=1), random=0)
    assert decision.reason == "deadline"


def test_decide_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        retry.decide(no_jitter, attempt=0, now=NOW.replace(tzinfo=None), deadline=FAR, random=0)


@settings(max_examples=200, deadline=None)
@given(
    policies,
    st.integers(0, 50),
    st.integers(0, 3 * 3600 * 1000),
    st.none() | st.integers(0, 3600 * 1000).map(lambda ms: timedelta(milliseconds=ms)),
    st.integers(0, 60_000).map(lambda ms: timedelta(milliseconds=ms)),
    st.none() | st.integers(1, 60),
    randoms,
)
def test_decisions_never_run_past_the_deadline(
    policy: retry.RetryPolicy,
    attempt: int,
    deadline_ms: int,
    retry_after: timedelta | None,
    stop_before: timedelta,
    max_attempts: int | None,
    random: float,
) -> None:
    policy = retry.RetryPolicy(
        base_delay=policy.base_delay,
        factor=policy.factor,
        max_delay=policy.max_delay,
        jitter=policy.jitter,
        max_attempts=max_attempts,
        stop_before_deadline=stop_before,
    )
    deadline = NOW + timedelta(milliseconds=deadline_ms)
    decision = retry.decide(
        policy, attempt=attempt, now=NOW, deadline=deadline, retry_after=retry_after, random=random
    )
    if max_attempts is not None and attempt + 1 >= max_attempts:
        assert decision == retry.RetryDecision(None, "max_attempts")
    elif decision.reason == "retry":
        assert decision.retry_at is not None
        assert decision.retry_at < deadline - stop_before
        assert decision.retry_at >= NOW + retry.backoff_delay(policy, attempt, random=random)
        assert decision.retry_at >= NOW + (retry_after or timedelta(0))
    else:
        assert decision == retry.RetryDecision(None, "deadline")
        earliest = NOW + max(retry.backoff_delay(policy, attempt, random=random), retry_after or timedelta(0))
        assert earliest >= deadline - stop_before


# ----------------------------------------------------------------------------------------- statuses


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_retriable_statuses(status: int) -> None:
    assert retry.is_retriable_status(status)


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 409, 413, 422, 499, 600])
def test_final_statuses(status: int) -> None:
    assert not retry.is_retriable_status(status)


def test_404_is_retriable_only_when_configured() -> None:
    assert retry.is_retriable_status(404, retry_404=True)
    assert not retry.is_retriable_status(404)
    assert not retry.is_retriable_status(400, retry_404=True)


# -------------------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"content-type": "application/json"}, None),
        ({"retry-after": "7"}, timedelta(seconds=7)),
        ({"Retry-After": "7"}, timedelta(seconds=7)),
        ({"RETRY-AFTER": " 1.5 "}, timedelta(seconds=1.5)),
        ({"retry-after": "0"}, timedelta(0)),
        ({"retry-after-ms": "250"}, timedelta(milliseconds=250)),
        ({"Retry-After-Ms": "12.5"}, timedelta(microseconds=12_500)),
        ({"retry-after-ms": "250", "retry-after": "7"}, timedelta(milliseconds=250)),
        ({"retry-after-ms": "soon", "retry-after": "7"}, timedelta(seconds=7)),
        ({"retry-after-ms": "-5", "retry-after": "7"}, timedelta(seconds=7)),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after": "Wed, 01 Jan 2025 12:00:30 GMT"}, timedelta(seconds=30)),
        ({"retry-after": "Wed, 01 Jan 2025 13:00:00 +0100"}, timedelta(0)),
        ({"retry-after": "Tue, 31 Dec 2024 23:00:00 GMT"}, timedelta(0)),
        ({"retry-after": "Wed, 01 Jan 2025 12:01:00 -0000"}, timedelta(minutes=1)),
        ({"retry-after": "Wed, 99 Foo 2025 12:01:00 GMT"}, None),
        ({"retry-after": "1e12"}, retry.MAX_RETRY_AFTER),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: timedelta | None) -> None:
    assert retry.parse_retry_after(headers, NOW) == expected


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["retry-after", "Retry-After-MS", "x"]), st.text(max_size=40)))
def test_parse_retry_after_never_raises_and_is_never_negative(headers: dict[str, str]) -> None:
    delay = retry.parse_retry_after(headers, NOW)
    assert delay is None or timedelta(0) <= delay <= retry.MAX_RETRY_AFTER
