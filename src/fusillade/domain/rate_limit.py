"""A token bucket for a per-minute rate limit (pure: times are passed in, in seconds, no I/O).

The bucket holds at most `burst(per_minute)` tokens, half a second's worth of the rate (at least one), and
refills continuously at `per_minute / 60` tokens a second; it starts full. A request spends one token when it is
claimed. The small capacity is what keeps bursts small: over any second at most the tokens held at its start
(half a second's worth) plus those refilled during it can be spent, 1.5 times the per-second rate at the very
worst (after an idle spell) and the per-second rate in a steady flow. The price: a bucket left full for more
than half a second loses what would overflow, so a claimer must come back as soon as a token is due.

The same arithmetic runs in the PostgreSQL claim (`functions/claim_requests.sql`), where the bucket of a model is
a row shared by every daemon; the daemon keeps one per model too (`daemon.lanes`), which mirrors the store's
level after each claim and says when the next token is due, so that the tick wakes then instead of polling.

A token limit (`tokens_per_minute`) is a bucket of the same shape counted in tokens: a request costs its
`estimate_tokens`, charged when it is claimed and corrected by its real usage when it completes (`charge`, which
may take the level below zero: the model then waits longer). A request is admitted while the bucket holds its
estimate, or whatever its estimate when the bucket is full (`admits`): a request larger than the capacity (half a
second's worth) passes then and takes the level below zero, so no request is ever blocked for good."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import orjson

REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
RESET_REQUESTS = "x-ratelimit-reset-requests"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
RESET_TOKENS = "x-ratelimit-reset-tokens"
_RESET_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_RESET_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
SECONDS_PER_MINUTE = 60.0
EPSILON = 1e-6
"""Tokens short of a whole one that still count as one: times of the order of a Unix timestamp in seconds carry
about 0.2 microseconds of float error."""


DEFAULT_OUTPUT_TOKENS = 256
"""The output tokens a request is assumed to produce when its body sets no `max_tokens`,
`max_completion_tokens` or `max_output_tokens` (embeddings: none)."""
CHARACTERS_PER_TOKEN = 4
_OUTPUT_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def estimate_tokens(body: str, url: str = "") -> int:
    """The tokens a request is expected to cost before it is sent: its prompt, about one token per four
    characters of its whole body (JSON syntax included: an over-estimate, corrected by the real usage), plus
    its output limit (`max_completion_tokens`, `max_tokens` or `max_output_tokens`, the first a non-negative
    integer) or `DEFAULT_OUTPUT_TOKENS`; an embedding (`url` ending in `/embeddings`) has no output."""
    prompt = (len(body) + CHARACTERS_PER_TOKEN - 1) // CHARACTERS_PER_TOKEN
    if url.rstrip("/").endswith("/embeddings"):
        return prompt
    output = DEFAULT_OUTPUT_TOKENS
    if any(name in body for name in _OUTPUT_LIMITS):  # parse only a body that may set a limit
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        if isinstance(document, dict):
            for name in _OUTPUT_LIMITS:
                value = document.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    output = value
                    break
    return prompt + output


def burst(per_minute: int) -> int:
    """The capacity of the bucket of `per_minute` requests a minute: half a second's worth, at least one."""
    return max(1, per_minute // 120)


@dataclass(slots=True)
class TokenBucket:
    """The bucket of one model. `now` is any monotonic time in seconds, the same clock for every call."""

    per_minute: int
    tokens: float
    updated_at: float

    @classmethod
    def full(cls, per_minute: int, now: float) -> TokenBucket:
        if per_minute <= 0:
            raise ValueError(f"a rate must be positive, got {per_minute} a minute")
        return cls(per_minute, float(burst(per_minute)), now)

    @property
    def capacity(self) -> int:
        return burst(self.per_minute)

    @property
    def per_second(self) -> float:
        return self.per_minute / SECONDS_PER_MINUTE

    def level(self, now: float) -> float:
        """The tokens held at `now` (refilled since the last change; a time before it refills nothing)."""
        elapsed = max(0.0, now - self.updated_at)
        return min(float(self.capacity), self.tokens + elapsed * self.per_second)

    def available(self, now: float) -> int:
        """Whole tokens held at `now`: how many requests may be claimed."""
        return math.floor(self.level(now) + EPSILON)

    def spend(self, count: int, now: float) -> None:
        """Spend `count` tokens at `now`; the level may go below zero (spent ahead, repaid by the refill)."""
        self.tokens = self.level(now) - count
        self.updated_at = max(now, self.updated_at)

    def refund(self, count: int, now: float) -> None:
        """Give back `count` tokens spent ahead and not used (at most up to the capacity)."""
        self.tokens = min(float(self.capacity), self.level(now) + count)
        self.updated_at = max(now, self.updated_at)

    def set_level(self, tokens: float, now: float) -> None:
        """Take the level another holder of the bucket reported at `now` (the store's shared bucket)."""
        self.tokens = min(float(self.capacity), tokens)
        self.updated_at = now

    def charge(self, tokens: float, now: float) -> None:
        """Charge `tokens` more (a request's real usage above its estimate), or give them back when negative (at
        most up to the capacity); the level may go below zero."""
        self.tokens = min(float(self.capacity), self.level(now) - tokens)
        self.updated_at = max(now, self.updated_at)

    def admits(self, cost: float, now: float) -> bool:
        """Whether a request costing `cost` may be claimed at `now`: the bucket holds it, or the bucket is full
        (a request larger than the capacity passes then, taking the level below zero)."""
        # A microsecond's worth of slack: times of the order of a Unix timestamp carry about 0.2 microseconds
        # of float error, a fraction of a token at thousands a second.
        slack = EPSILON + self.per_second * 1e-6
        return self.level(now) >= min(cost, float(self.capacity)) - slack

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds from `now` until the bucket `admits` a request costing `cost` (0 if it does already), rounded
        up to the microsecond (the stores' clocks count microseconds: a wait rounded down would fall short)."""
        missing = min(cost, float(self.capacity)) - self.level(now)
        return max(0.0, math.ceil(missing / self.per_second * 1e6) / 1e6)

    def next_token(self, now: float) -> float:
        """When the bucket holds a whole token (`now` if it does already)."""
        level = self.level(now)
        if level >= 1.0 - EPSILON:
            return now
        return now + (1.0 - level) / self.per_second

    def refilled_at(self, count: int) -> float | None:
        """When the bucket, as last changed, holds `count` tokens; None if it held them already then."""
        if self.tokens >= count - EPSILON:
            return None
        return self.updated_at + (count - self.tokens) / self.per_second

    def change_rate(self, per_minute: int, now: float) -> None:
        """A new rate from now on (a reloaded route): the tokens held stay, within the new capacity."""
        if per_minute <= 0:
            raise ValueError(f"a rate must be positive, got {per_minute} a minute")
        self.tokens = self.level(now)
        self.updated_at = max(now, self.updated_at)
        self.per_minute = per_minute
        self.tokens = min(self.tokens, float(self.capacity))


def requests_used_up(headers: Mapping[str, str]) -> timedelta | None:
    """How long until the upstream takes requests again when its OpenAI-style headers say none are left
    (`x-ratelimit-remaining-requests: 0`, `x-ratelimit-reset-requests: 6m0s`); None when some are left, or the
    headers are missing or unreadable."""
    remaining = headers.get(REMAINING_REQUESTS)
    if remaining is None or remaining.strip() != "0":
        return None
    return parse_reset(headers.get(RESET_REQUESTS, ""))


def tokens_used_up(headers: Mapping[str, str]) -> timedelta | None:
    """`requests_used_up` for tokens: how long until the upstream takes tokens again when its headers say none
    are left (`x-ratelimit-remaining-tokens: 0`, `x-ratelimit-reset-tokens`)."""
    remaining = headers.get(REMAINING_TOKENS)
    if remaining is None or remaining.strip() != "0":
        return None
    return parse_reset(headers.get(RESET_TOKENS, ""))


def limits_used_up(headers: Mapping[str, str], *, requests: bool, tokens: bool) -> timedelta | None:
    """The longer of `requests_used_up` (with `requests`) and `tokens_used_up` (with `tokens`); None if
    neither says the upstream's count is used up."""
    waits = [
        wait
        for wait in (
            requests_used_up(headers) if requests else None,
            tokens_used_up(headers) if tokens else None,
        )
        if wait is not None
    ]
    return max(waits, default=None)


def parse_reset(text: str) -> timedelta | None:
    """An OpenAI reset duration (`1s`, `6m0s`, `20ms`, `1h2m3.5s`, or a plain number of seconds); None if
    unreadable."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _RESET_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            return None
        seconds = sum(float(number) * _RESET_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return timedelta(seconds=seconds)
