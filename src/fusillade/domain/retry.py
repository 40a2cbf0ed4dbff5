"""Retry policy: which upstream failures are retried, and when the next attempt may start.

The delay after a failed attempt grows exponentially from `base_delay` by `factor`, is spread by a random
`jitter` so that many requests failing together do not come back together, and is capped at `max_delay`.
A `Retry-After` from the upstream is a floor: the next attempt never starts before it. A request is given up
when it has used `max_attempts`, or when its next attempt would start at or after the batch's deadline (less
`stop_before_deadline`): the request then fails with its last error instead of expiring later.

Everything here is pure: the current time and the random number are passed in.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

RETRIABLE_STATUSES = frozenset({408, 429})
"""Besides every 5xx."""

MAX_RETRY_AFTER = timedelta(days=365)
"""A longer Retry-After is read as this (it only has to be past any deadline)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    base_delay: timedelta = timedelta(seconds=1)
    """Delay after the first failed attempt, before jitter."""
    factor: float = 2.0
    """Each further failure multiplies the delay by this."""
    max_delay: timedelta = timedelta(seconds=60)
    """No backoff delay is longer (a Retry-After may be)."""
    jitter: float = 0.2
    """The delay is multiplied by a random factor in `[1 - jitter, 1 + jitter]`."""
    max_attempts: int | None = 10
    """Attempts in all, the first included; None: no limit but the deadline."""
    stop_before_deadline: timedelta = timedelta(0)
    """Give up when the next attempt would start later than this before the deadline."""

    def __post_init__(self) -> None:
        if self.base_delay < timedelta(0):
            raise ValueError(f"RetryPolicy.base_delay must not be negative, not {self.base_delay}.")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"RetryPolicy.factor must be a finite number of at least 1, not {self.factor}.")
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"RetryPolicy.max_delay ({self.max_delay}) must not be shorter than base_delay "
                f"({self.base_delay})."
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be between 0 and 1, not {self.jitter}.")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1 or None, not {self.max_attempts}.")
        if self.stop_before_deadline < timedelta(0):
            raise ValueError(
                f"RetryPolicy.stop_before_deadline must not be negative, not {self.stop_before_deadline}."
            )


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry_at: datetime | None
    """When the next attempt may start; None: give up."""
    reason: Literal["retry", "max_attempts", "deadline"]


def backoff_delay(policy: RetryPolicy, attempt: int, *, random: float) -> timedelta:
    """The delay after the failure of attempt number `attempt` (0 for the first), with `random` in [0, 1)
    choosing the jitter. Never negative, never longer than `policy.max_delay`."""
    if attempt < 0:
        raise ValueError(f"attempt must not be negative, not {attempt}.")
    if not 0 <= random < 1:
        raise ValueError(f"random must be in [0, 1), not {random}.")
    base = policy.base_delay.total_seconds()
    cap = policy.max_delay.total_seconds()
    try:
        growth = policy.factor**attempt
    except OverflowError:
        growth = math.inf
    delay = min(base * growth, cap) if base > 0 else 0.0
    spread = 1 - policy.jitter + 2 * policy.jitter * random
    return timedelta(seconds=max(0.0, min(delay * spread, cap)))


def decide(
    policy: RetryPolicy,
    *,
    attempt: int,
    now: datetime,
    deadline: datetime,
    retry_after: timedelta | None = None,
    random: float,
    immediate: bool = False,
) -> RetryDecision:
    """Whether and when to retry after attempt number `attempt` (0-based) failed with a retriable error.

    The next attempt starts after the backoff delay, or after `retry_after` if that is longer; it is given
    up when `max_attempts` are used, or when it would start at or after `deadline - stop_before_deadline`.
    `immediate`: the next attempt goes elsewhere (another endpoint of a pool, the failed one being the cause),
    so it starts now, with neither backoff nor `retry_after` (which spoke for the failed endpoint); it still
    counts as an attempt.
    """
    if now.tzinfo is None or deadline.tzinfo is None:
        raise ValueError("decide needs timezone-aware datetimes (UTC).")
    if policy.max_attempts is not None and attempt + 1 >= policy.max_attempts:
        return RetryDecision(None, "max_attempts")
    delay = timedelta(0) if immediate else backoff_delay(policy, attempt, random=random)
    if retry_after is not None and retry_after > delay and not immediate:
        delay = retry_after
    # Compare durations rather than adding first, so that a huge Retry-After cannot overflow a datetime.
    if delay >= deadline - policy.stop_before_deadline - now:
        return RetryDecision(None, "deadline")
    return RetryDecision(now + delay, "retry")


def is_retriable_status(status: int, *, retry_404: bool = False) -> bool:
    """408, 429 and every 5xx are worth retrying; 404 only when configured (an upstream still loading a
    model may answer 404 for a while)."""
    return status in RETRIABLE_STATUSES or 500 <= status <= 599 or (retry_404 and status == 404)


def parse_retry_after(headers: Mapping[str, str], now: datetime) -> timedelta | None:
    """How long the upstream asks us to wait: `retry-after-ms` (milliseconds) first, then `retry-after`
    (seconds, or an HTTP date; a date in the past means no wait). Header names are matched in any case.
    None when neither header is present and valid."""
    values = {name.lower(): value for name, value in headers.items()}
    milliseconds = _non_negative_number(values.get("retry-after-ms"))
    if milliseconds is not None:
        return _clamp(milliseconds / 1000)
    text = values.get("retry-after")
    if text is None:
        return None
    seconds = _non_negative_number(text)
    if seconds is not None:
        return _clamp(seconds)
    try:
        moment = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _clamp(max(0.0, (moment - now).total_seconds()))


def _non_negative_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _clamp(seconds: float) -> timedelta:
    return timedelta(seconds=min(seconds, MAX_RETRY_AFTER.total_seconds()))
