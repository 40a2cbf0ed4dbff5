"""The token bucket of a per-minute rate limit, alone and driven by a greedy simulated claimer; the reading of
OpenAI's `x-ratelimit-*-requests` headers."""

from __future__ import annotations

import bisect
import itertools
from datetime import timedelta

import pytest

from fusillade.domain.rate_limit import TokenBucket, burst, parse_reset, requests_used_up


def test_capacity_is_half_a_seconds_worth_and_at_least_one() -> None:
    assert burst(600) == 5
    assert burst(60_000) == 500
    assert burst(60) == 1
    assert burst(1) == 1


def test_starts_full_and_refills_continuously() -> None:
    bucket = TokenBucket.full(600, now=0.0)
    assert bucket.available(0.0) == 5
    bucket.spend(5, 0.0)
    assert bucket.available(0.0) == 0
    assert bucket.available(0.05) == 0
    assert bucket.available(0.1) == 1
    assert bucket.available(0.25) == 2
    assert bucket.available(10.0) == 5  # never above its capacity


def test_next_token_is_when_a_whole_token_is_back() -> None:
    bucket = TokenBucket.full(600, now=0.0)
    bucket.spend(5, 0.0)
    assert bucket.next_token(0.0) == pytest.approx(0.1)
    assert bucket.next_token(0.04) == pytest.approx(0.1)
    assert bucket.next_token(0.3) == 0.3


def test_spending_ahead_is_repaid_before_the_next_token() -> None:
    bucket = TokenBucket.full(60, now=0.0)
    bucket.spend(3, 0.0)  # 1 held, 2 ahead: -2
    assert bucket.available(2.0) == 0
    assert bucket.next_token(0.0) == pytest.approx(3.0)


def test_refund_and_a_level_reported_by_the_store() -> None:
    bucket = TokenBucket.full(600, now=0.0)
    bucket.spend(4, 0.0)
    bucket.refund(3, 0.0)
    assert bucket.available(0.0) == 4
    bucket.refund(100, 0.0)
    assert bucket.available(0.0) == 5
    bucket.set_level(0.5, 1.0)
    assert bucket.available(1.0) == 0
    assert bucket.next_token(1.0) == pytest.approx(1.05)


def test_a_time_before_the_last_change_refills_nothing() -> None:
    bucket = TokenBucket.full(600, now=10.0)
    bucket.spend(5, 10.0)
    assert bucket.level(9.0) == 0.0
    bucket.spend(0, 9.0)
    assert bucket.updated_at == 10.0


def test_a_new_rate_keeps_the_tokens_within_the_new_capacity() -> None:
    bucket = TokenBucket.full(6000, now=0.0)
    assert bucket.available(0.0) == 50
    bucket.change_rate(600, 0.0)
    assert bucket.available(0.0) == 5
    bucket.spend(5, 0.0)
    bucket.change_rate(1200, 0.0)
    assert bucket.available(0.1) == 2


def test_rates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket.full(0, now=0.0)


@pytest.mark.parametrize("per_minute", [600, 1234, 60_000])
def test_a_greedy_claimer_holds_the_rate_and_no_second_bursts_above_one_and_a_half_times(per_minute: int) -> None:
    """A claimer that takes every whole token as soon as it is there, checked every millisecond for a minute."""
    bucket = TokenBucket.full(per_minute, now=0.0)
    taken: list[tuple[float, int]] = []
    for step in range(60_000):
        now = step / 1000
        count = bucket.available(now)
        if count:
            bucket.spend(count, now)
            taken.append((now, count))
    total = sum(count for _, count in taken)
    assert per_minute <= total <= per_minute + burst(per_minute)
    per_second = per_minute / 60
    times = [when for when, _ in taken]
    spent = list(itertools.accumulate((count for _, count in taken), initial=0))  # spent[i]: before taken[i]
    for start in range(0, 59_000, 50):
        first = bisect.bisect_left(times, start / 1000)
        end = bisect.bisect_left(times, start / 1000 + 1)
        assert spent[end] - spent[first] <= 1.5 * per_second + 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5), (" 7s ", 7.0)],
)
def test_openai_reset_durations_are_read(text: str, seconds: float) -> None:
    assert parse_reset(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "-1", "1s2x", "nan"])
def test_unreadable_reset_durations_are_none(text: str) -> None:
    assert parse_reset(text) is None


def test_requests_are_used_up_only_when_none_are_left_and_the_reset_is_readable() -> None:
    reset = {"x-ratelimit-reset-requests": "1s"}
    assert requests_used_up({"x-ratelimit-remaining-requests": "0", **reset}) == timedelta(seconds=1)
    assert requests_used_up({"x-ratelimit-remaining-requests": "3", **reset}) is None
    assert requests_used_up(reset) is None
    assert requests_used_up({"x-ratelimit-remaining-requests": "0"}) is None
