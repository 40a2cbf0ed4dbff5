"""A request's token estimate, and the token bucket's admission rule (`domain.rate_limit`): a request passes
while the bucket holds its estimate, or whatever its size when the bucket is full; real usage corrects it."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from fusillade.domain.rate_limit import (
    DEFAULT_OUTPUT_TOKENS,
    TokenBucket,
    estimate_tokens,
    limits_used_up,
    tokens_used_up,
)

CHAT = "/v1/chat/completions"


def body(**members: object) -> str:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 95}], **members}).decode()


def test_the_prompt_is_a_token_per_four_characters_of_the_body_plus_the_default_output() -> None:
    text = body()
    assert estimate_tokens(text, CHAT) == (len(text) + 3) // 4 + DEFAULT_OUTPUT_TOKENS


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_an_output_limit_replaces_the_default(name: str) -> None:
    text = body(**{name: 40})
    assert estimate_tokens(text, CHAT) == (len(text) + 3) // 4 + 40


def test_max_completion_tokens_comes_first_and_unreadable_limits_are_ignored() -> None:
    both = body(max_tokens=10, max_completion_tokens=30)
    assert estimate_tokens(both, CHAT) == (len(both) + 3) // 4 + 30
    for text in (body(max_tokens=-1), body(max_tokens="9"), body(max_tokens=True), body(max_tokens=2.5)):
        assert estimate_tokens(text, CHAT) == (len(text) + 3) // 4 + DEFAULT_OUTPUT_TOKENS
    broken = '{"max_tokens": 5'  # not JSON: the default
    assert estimate_tokens(broken, CHAT) == 4 + DEFAULT_OUTPUT_TOKENS


def test_an_embedding_has_no_output() -> None:
    text = body(max_tokens=40)
    assert estimate_tokens(text, "/v1/embeddings") == (len(text) + 3) // 4


def test_admits_while_the_bucket_holds_the_estimate() -> None:
    bucket = TokenBucket.full(60_000, now=0.0)  # 1,000 a second, a capacity of 500
    assert bucket.admits(120, 0.0)
    for _ in range(4):
        bucket.spend(120, 0.0)
    assert bucket.level(0.0) == pytest.approx(20.0)
    assert not bucket.admits(120, 0.0)
    assert bucket.wait_for(120, 0.0) == pytest.approx(0.1)
    assert bucket.admits(120, 0.1)
    assert bucket.wait_for(120, 0.1) == 0.0


def test_a_request_larger_than_the_capacity_passes_when_the_bucket_is_full_and_leaves_it_below_zero() -> None:
    bucket = TokenBucket.full(60_000, now=0.0)
    bucket.spend(100, 0.0)
    assert not bucket.admits(2_000, 0.0)  # not full
    assert bucket.wait_for(2_000, 0.0) == pytest.approx(0.1)  # until full, not until 2,000
    assert bucket.admits(2_000, 0.1)
    bucket.spend(2_000, 0.1)
    assert bucket.level(0.1) == pytest.approx(-1_500.0)
    assert bucket.wait_for(10, 0.1) == pytest.approx(1.51)  # the big request is repaid first


def test_real_usage_corrects_the_level_within_the_capacity() -> None:
    bucket = TokenBucket.full(60_000, now=0.0)
    bucket.spend(400, 0.0)
    bucket.charge(300, 0.0)  # used 300 more than estimated
    assert bucket.level(0.0) == pytest.approx(-200.0)
    bucket.charge(-1_000, 0.0)  # used 1,000 fewer: given back up to the capacity
    assert bucket.level(0.0) == pytest.approx(500.0)


def test_a_token_limit_holds_its_rate_under_a_greedy_claimer() -> None:
    """Requests of 300 tokens (more than half the capacity), claimed whenever admitted over a simulated
    minute: the tokens spent are the rate's within one request, whatever the estimate's size."""
    bucket = TokenBucket.full(60_000, now=0.0)
    spent = 0
    now = 0.0
    while now < 60.0:
        if bucket.admits(300, now):
            bucket.spend(300, now)
            spent += 300
        now += 0.001
    assert abs(spent - 60_000) <= 500 + 300


def test_tokens_are_used_up_when_none_are_left_and_the_longer_reset_wins() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert tokens_used_up(headers) == timedelta(minutes=6)
    assert tokens_used_up({**headers, "x-ratelimit-remaining-tokens": "120"}) is None
    assert limits_used_up(headers, requests=True, tokens=True) == timedelta(minutes=6)
    assert limits_used_up(headers, requests=True, tokens=False) == timedelta(seconds=1)
    assert limits_used_up(headers, requests=False, tokens=False) is None
    assert limits_used_up(
        {**headers, "x-ratelimit-reset-tokens": "soon"}, requests=True, tokens=True
    ) == timedelta(seconds=1)
