"""Where a model's requests go, and how long each phase of a call may take."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseTimeouts:
    """Each phase of an upstream call has its own limit; None means no limit for that phase."""

    connect: timedelta | None = timedelta(seconds=10)
    """Establishing the connection (TCP and TLS)."""
    first_byte: timedelta | None = timedelta(seconds=300)
    """From sending the request to the response headers, and for streams to the first SSE event."""
    idle: timedelta | None = timedelta(seconds=60)
    """Longest gap between two SSE events (or two body chunks) once the response started."""
    total: timedelta | None = timedelta(seconds=1800)
    """The whole call, from connecting to the last byte."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """A model's upstream. The host always comes from here, never from an input line (the line's `url` is a
    path appended to `base_url`; a base URL ending in `/v1` and a path starting with `/v1/` are joined once)."""

    base_url: str
    """e.g. `http://127.0.0.1:8000` or `https://api.openai.com/v1`."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as `Authorization: Bearer …`; resolved from the environment by the configuration, never stored."""
    concurrency: int = 16
    """Requests of this model in flight at once (across every daemon on a shared database); with `adaptive`,
    the most the limit may grow to."""
    adaptive: bool = False
    """Find the limit from the upstream's answers (refusals and latency), between `min_concurrency` and
    `concurrency` (`domain.adaptive_limit`)."""
    min_concurrency: int = 1
    """With `adaptive`: the least the limit may be cut to (and where it starts)."""
    stream: bool = False
    """Ask the upstream for SSE and reassemble the events into the non-streaming body."""
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    retry_404: bool = False
    """Treat 404 as retriable (an upstream still loading a model may answer 404 for a while)."""
    requests_per_minute: int | None = None
    """Requests of this model sent per minute at most (across every daemon on a shared database); a token bucket
    of half a second's worth (`domain.rate_limit`). None: no rate limit."""
