"""A model's table of the configuration (`[models."<name>"]`, the default route), with its timeouts and pricing,
and its mapping onto `Route`."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from fusillade.config.values import (
    BaseUrls,
    Count,
    EnvVarName,
    ModelName,
    OptionalPositiveDuration,
    PositiveDuration,
    Price,
    Section,
)
from fusillade.domain.usage import Pricing
from fusillade.upstream.routes import PhaseTimeouts, Route

_TIMEOUTS = PhaseTimeouts()


class TimeoutsSection(Section):
    """`[models."<name>".timeouts]`: limits of each phase of an upstream call; "none": no limit."""

    connect: OptionalPositiveDuration = _TIMEOUTS.connect
    """Establishing the connection (TCP and TLS)."""
    first_byte: OptionalPositiveDuration = _TIMEOUTS.first_byte
    """From sending the request to the response headers (for streams, to the first event)."""
    idle: OptionalPositiveDuration = _TIMEOUTS.idle
    """Longest gap between two stream events or body chunks."""
    total: OptionalPositiveDuration = _TIMEOUTS.total
    """The whole call, from connecting to the last byte."""

    def phase_timeouts(self) -> PhaseTimeouts:
        return PhaseTimeouts(**dict(self))


class PricingSection(Section):
    """`[models."<name>".pricing]`: what the upstream charges, in USD per million tokens, for the batch's `cost`
    (exact decimals: write them as in the provider's price list, e.g. `input = 0.15`)."""

    input: Price
    """Input (prompt) tokens."""
    output: Price
    """Output (completion) tokens, reasoning tokens included."""
    cached_input: Price | None = None
    """Input tokens served from the upstream's prompt cache; none: priced as other input."""

    def pricing(self) -> Pricing:
        return Pricing.per_million(input=self.input, output=self.output, cached_input=self.cached_input)


class RouteSection(Section):
    """`[models."<name>"]` and the default route (`[default_route]` or `[models."*"]`): where a model's requests
    go and how many run at once."""

    base_url: BaseUrls
    """The upstream, http(s), such as "https://api.openai.com/v1"; the request's path is appended. A list of
    URLs is a pool of endpoints serving the model: each call goes to the healthy one with the fewest calls in
    flight."""
    api_key_env: EnvVarName | None = None
    """Name of the environment variable holding the upstream's API key (sent as a Bearer token); none: no key."""
    concurrency: Count = 16
    """Requests of this model in flight at once, across every daemon sharing the database; with `adaptive`, the
    ceiling of the limit."""
    adaptive: bool = False
    """Find the limit from the upstream's answers: cut on refusals (429, 503, connection errors, timeouts) and
    when its latency shows it is queueing, grown while calls succeed; between `min_concurrency` and
    `concurrency`."""
    min_concurrency: Count = 1
    """With `adaptive`: the floor of the limit, where it starts."""
    fallback: ModelName | None = None
    """Another model with a table of its own in [models] that may answer this model's requests instead (the
    request's `model` is rewritten to it): see `fallback_when_remaining`."""
    fallback_when_remaining: PositiveDuration | None = None
    """With `fallback`: a request whose batch has less than this left before its deadline goes to the fallback
    (escalation: a faster or more available model finishes the batch in time); none: never for that reason."""
    stream: bool = False
    """Ask the upstream for server-sent events and reassemble them (reads with first-byte and idle timeouts)."""
    retry_404: bool = False
    """Treat 404 as retriable (an upstream still loading a model may answer 404 for a while)."""
    timeouts: TimeoutsSection = Field(default_factory=TimeoutsSection)
    """Limits of each phase of a call."""
    pricing: PricingSection | None = None
    """The model's prices, for the cost of batches; none: their cost is unknown (usage is counted anyway)."""
    requests_per_minute: Count | None = None
    """Requests of this model sent per minute at most, across every daemon sharing the database (a token bucket
    of half a second's worth, so bursts stay small); none: no rate limit."""
    tokens_per_minute: Count | None = None
    """Tokens of this model's requests per minute at most (each estimated from its body and output limit, then
    corrected by its real usage; a bucket of half a second's worth). SQLite only for now; none: no token limit."""

    @model_validator(mode="after")
    def _fallback_needs_a_model(self) -> Self:
        if self.fallback_when_remaining is not None and self.fallback is None:
            raise ValueError("fallback_when_remaining is set without fallback (the model to fall back to)")
        return self

    @model_validator(mode="after")
    def _adaptive_bounds(self) -> Self:
        if self.adaptive and self.min_concurrency > self.concurrency:
            raise ValueError(
                f"min_concurrency ({self.min_concurrency}) must not be above concurrency ({self.concurrency}), "
                "the ceiling of an adaptive limit"
            )
        return self

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The endpoints: `base_url` as one, or the pool."""
        return (self.base_url,) if isinstance(self.base_url, str) else self.base_url

    def route(self, api_key: str | None) -> Route:
        """This route with the key already read from the environment."""
        return Route(
            base_urls=self.base_urls,
            api_key=api_key,
            concurrency=self.concurrency,
            adaptive=self.adaptive,
            min_concurrency=self.min_concurrency,
            fallback=self.fallback,
            fallback_when_remaining=self.fallback_when_remaining,
            stream=self.stream,
            timeouts=self.timeouts.phase_timeouts(),
            retry_404=self.retry_404,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )
