"""What an upstream call came to. The daemon turns each outcome into one queue write:
`Success` -> Complete, `Retriable` -> Reschedule (or Fail once retries are used up), `Permanent` -> Fail."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from fusillade.domain.usage import Usage


@dataclass(frozen=True, slots=True, kw_only=True)
class Success:
    status_code: int
    body: str
    """The response body as JSON text (for streams: the events reassembled into the non-streaming shape)."""
    usage: Usage | None
    """The token usage the response reported (`domain.usage`), read while the body was parsed anyway; None
    when it reported none."""
    requests_used_up: timedelta | None = None
    """On a route with a rate limit: the upstream's headers said no requests are left, for this long
    (`domain.rate_limit.requests_used_up`); on a route with a token limit, or no tokens
    (`domain.rate_limit.limits_used_up`: the longer of the two)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Retriable:
    """Worth another attempt: 408, 429, 5xx (404 if configured), connection errors, timeouts, broken streams."""

    code: str
    """`http_<status>` for an HTTP error, else e.g. `timeout`, `connection_error`, `stream_error`."""
    message: str
    status_code: int | None = None
    body: str | None = None
    retry_after: timedelta | None = None
    """The delay the upstream asked for (`retry-after-ms` / `retry-after`), a floor for the next attempt."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Permanent:
    """Retrying cannot help: other 4xx, a request the upstream cannot take, an unusable response."""

    code: str
    message: str
    status_code: int | None = None
    body: str | None = None


Outcome = Success | Retriable | Permanent
