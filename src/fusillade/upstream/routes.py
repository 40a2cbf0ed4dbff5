"""Where a model's requests go, and how long each phase of a call may take."""

from __future__ import annotations

import dataclasses
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
    path appended to `base_url`; a base URL ending in `/v1` and a path starting with `/v1/` are joined once).
    A route with several `base_urls` is a pool: each call goes to one of them (`daemon.pools`)."""

    base_url: str = ""
    """e.g. `http://127.0.0.1:8000` or `https://api.openai.com/v1`; for a pool, its first endpoint."""
    base_urls: tuple[str, ...] = ()
    """Every endpoint of a pool (`domain.endpoint_pool`), each once; filled from `base_url` when not given, so
    a route of one endpoint is `(base_url,)`."""
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
    fallback: str | None = None
    """Another model (with a route of its own) that this model's requests may be sent to instead: see
    `fallback_when_remaining`."""
    fallback_when_remaining: timedelta | None = None
    """Send a request to `fallback` when less than this is left before its batch's deadline (escalation)."""
    stream: bool = False
    """Ask the upstream for SSE and reassemble the events into the non-streaming body."""
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    retry_404: bool = False
    """Treat 404 as retriable (an upstream still loading a model may answer 404 for a while)."""
    requests_per_minute: int | None = None
    """Requests of this model sent per minute at most (across every daemon on a shared database); a token bucket
    of half a second's worth (`domain.rate_limit`). None: no rate limit."""
    tokens_per_minute: int | None = None
    """Tokens (estimated, corrected by the real usage) of this model's requests per minute at most; a bucket of
    half a second's worth (`domain.rate_limit`). None: no token limit."""

    def __post_init__(self) -> None:
        if not isinstance(self.base_urls, tuple):
            object.__setattr__(self, "base_urls", tuple(self.base_urls))
        if not self.base_urls:
            if not self.base_url:
                raise ValueError("A Route needs a base_url (or base_urls for a pool of endpoints).")
            object.__setattr__(self, "base_urls", (self.base_url,))
        elif not self.base_url:
            object.__setattr__(self, "base_url", self.base_urls[0])
        elif self.base_url != self.base_urls[0]:
            if len(self.base_urls) > 1:
                raise ValueError(
                    f"Route.base_url ({self.base_url!r}) must be the first of base_urls; give base_urls alone."
                )
            # One endpoint: `base_url` wins, as `dataclasses.replace(route, base_url=...)` means.
            object.__setattr__(self, "base_urls", (self.base_url,))
        if len(set(self.base_urls)) != len(self.base_urls):
            raise ValueError(f"Route.base_urls lists an endpoint twice: {list(self.base_urls)}.")

    def endpoint_route(self, base_url: str) -> Route:
        """This route with `base_url` as its only endpoint: what a call to one endpoint of the pool is sent
        with."""
        return dataclasses.replace(self, base_url=base_url, base_urls=(base_url,))
