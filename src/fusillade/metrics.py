"""Prometheus metrics of the daemon. Each `DaemonMetrics` registers its instruments on the registry it is
given, so a test (or a process running two daemons) can keep its own; the HTTP API exposes the registry.

Every label value comes from the operator's configuration or from a fixed set, never from what a tenant wrote,
so `/metrics` shows no tenant's string and its size does not grow with the tenants' input:

- `model`: a model with a route of its own (`[models."NAME"]`) keeps its name; every model served by the default
  route is `*` (`DEFAULT_ROUTE_LABEL`);
- `endpoint` (of a pool's metrics): `host:port` of one of the route's `base_url`s, never the rest of the URL
  (a path may hold a secret);
- `code` (of a retried attempt): `timeout`, `connection_error`, `stream_error`, `upstream_error`, `http_404`,
  `http_408`, `http_429`, `http_500`, `http_502`, `http_503`, `http_504`, `http_5xx` (any other 5xx),
  `http_other`, `other` (`code_label`);
- `outcome`, `result`, `task`: fixed sets named in each metric's help; `kind` (of a token count): `input`,
  `cached_input` (part of `input`), `output`, `reasoning` (part of `output`), as in OpenAI's usage.

Owners, custom ids and the names of models without a route of their own never become labels."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fusillade.domain.usage import Usage
from fusillade.upstream import classify

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_DATABASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_SIZE_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000)


DEFAULT_ROUTE_LABEL: Final = "*"
"""The `model` label of every model served by the default route (as `[models."*"]` names that route)."""

_OUTCOMES = ("completed", "failed", "canceled")
_RESULTS = ("success", "retriable", "permanent", "expired")
_CODES: Final = frozenset(
    {
        classify.TIMEOUT,
        classify.CONNECTION_ERROR,
        classify.STREAM_ERROR,
        classify.UPSTREAM_ERROR,
        *(f"http_{status}" for status in (404, 408, 429, 500, 502, 503, 504)),
    }
)


@dataclass(frozen=True, slots=True, eq=False)
class ModelMetrics:
    """The per-request instruments of one `model` label, labelled once (a label lookup per request would cost more
    than the update itself). Compared and hashed by identity."""

    finished: dict[str, Counter]
    """By outcome: completed, failed, canceled."""
    latency: dict[str, Histogram]
    """By result: success, retriable, permanent, expired."""
    input_tokens: Counter
    cached_input_tokens: Counter
    output_tokens: Counter
    reasoning_tokens: Counter
    without_usage: Counter

    def spent(self, usage: Usage | None) -> None:
        """Count the usage of a request whose `Complete` applied (None: its response reported none). A count of 0
        is not added: it would change nothing but cost the update."""
        if usage is None:
            self.without_usage.inc()
            return
        self.input_tokens.inc(usage.input_tokens)
        if usage.cached_tokens:
            self.cached_input_tokens.inc(usage.cached_tokens)
        if usage.output_tokens:
            self.output_tokens.inc(usage.output_tokens)
        if usage.reasoning_tokens:
            self.reasoning_tokens.inc(usage.reasoning_tokens)


def code_label(code: str | None) -> str:
    """The `code` label of a retried attempt's error code: one of a fixed set (see the module's table)."""
    if code is None:
        return "other"
    if code in _CODES:
        return code
    if code.startswith("http_5"):
        return "http_5xx"
    return "http_other" if code.startswith("http_") else "other"


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._models: dict[str, ModelMetrics] = {}
        self._routed: frozenset[str] = frozenset()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_finished = Counter(
            "fusillade_requests_finished",
            "Requests that reached a final outcome in this daemon, by model and outcome "
            "(completed, failed, canceled).",
            ["model", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "fusillade_tokens",
            "Tokens of the responses whose completion this daemon wrote, as their usage reported them, by model "
            "and kind (input, cached_input, output, reasoning; cached_input is part of input and reasoning part "
            "of output, as in OpenAI's usage).",
            ["model", "kind"],
            registry=r,
        )
        self.requests_without_usage = Counter(
            "fusillade_requests_without_usage",
            "Requests this daemon completed whose response reported no usage (not in fusillade_tokens_total), by "
            "model.",
            ["model"],
            registry=r,
        )
        self.retries = Counter(
            "fusillade_request_retries",
            "Attempts that failed with a retriable error and were scheduled again, by model and error code.",
            ["model", "code"],
            registry=r,
        )
        self.in_flight = _PerModel(
            self.label, "fusillade_requests_in_flight", "Requests this daemon is working on, by model."
        )
        r.register(self.in_flight)
        self.limits = _PerModel(
            self.label,
            "fusillade_model_limit",
            "The concurrency limit of each model's lane now (an adaptive limit moves; the default route's models "
            "are summed), by model.",
        )
        r.register(self.limits)
        self.fallbacks = Counter(
            "fusillade_fallbacks",
            "Calls sent to a model's fallback instead of its own route, by model, fallback and reason (down: "
            "every endpoint of the model's own was ejected; deadline: fallback_when_remaining).",
            ["model", "fallback", "reason"],
            registry=r,
        )
        self.limit_cuts = Counter(
            "fusillade_model_limit_cuts",
            "Times a model's adaptive limit was cut, by model and reason (refused: 429, 503, connection errors "
            "or timeouts; latency: the upstream was queueing).",
            ["model", "reason"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "fusillade_upstream_latency_seconds",
            "Duration of upstream calls, by model and result (success, retriable, permanent).",
            ["model", "result"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.claim_duration = Histogram(
            "fusillade_claim_duration_seconds",
            "Duration of claim transactions.",
            buckets=_DATABASE_BUCKETS,
            registry=r,
        )
        self.claim_size = Histogram(
            "fusillade_claim_size", "Requests returned per claim.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.commit_duration = Histogram(
            "fusillade_commit_duration_seconds",
            "Duration of group-commit transactions (many requests' state writes at once).",
            buckets=_DATABASE_BUCKETS,
            registry=r,
        )
        self.commit_size = Histogram(
            "fusillade_commit_size", "State writes per group commit.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.write_conflicts = Counter(
            "fusillade_write_conflicts",
            "State writes the database refused (the request was finished, cancelled, expired or reclaimed).",
            registry=r,
        )
        self.reclaimed = Counter(
            "fusillade_requests_reclaimed",
            "Requests of dead or silent daemons this daemon put back to pending.",
            registry=r,
        )
        self.stale_claims = Counter(
            "fusillade_stale_claims_released",
            "Claimed requests given back unsent because the claim was too old when its call was to start (the "
            "daemon was paused so long that the others may have taken the request over).",
            registry=r,
        )
        self.fenced = Counter(
            "fusillade_daemon_fenced",
            "Times this daemon found itself declared dead (its heartbeats missed stale_after), dropped its calls "
            "in flight and registered again.",
            registry=r,
        )
        self.rows_purged = Counter(
            "fusillade_rows_purged", "Rows of deleted batches and files removed for good.", registry=r
        )
        self.lane_pauses = Counter(
            "fusillade_model_pauses",
            "Times a model's lane was paused because its upstream answered 429.",
            ["model"],
            registry=r,
        )
        self.endpoint_errors = Counter(
            "fusillade_endpoint_errors",
            "Calls to an endpoint of a pool that failed because of it (no connection, 5xx, timeout, broken "
            "stream), by model and endpoint (host:port).",
            ["model", "endpoint"],
            registry=r,
        )
        self.endpoint_ejections = Counter(
            "fusillade_endpoint_ejections",
            "Times an endpoint of a pool was ejected (left out for a cool-down), by model and endpoint.",
            ["model", "endpoint"],
            registry=r,
        )
        self.endpoints = _PerEndpoint(self.label)
        r.register(self.endpoints)
        self.database_errors = Counter(
            "fusillade_database_errors",
            "Database calls of the daemon that failed and were retried, by task.",
            ["task"],
            registry=r,
        )

    def use_routes(self, models: Iterable[str]) -> None:
        """The models with a route of their own (they keep their name as `model` label; every other model is
        labelled `DEFAULT_ROUTE_LABEL`). Called by the daemon with its routing table, and on every change."""
        self._routed = frozenset(models)

    def label(self, model: str) -> str:
        """The `model` label of requests for `model`."""
        return model if model in self._routed else DEFAULT_ROUTE_LABEL

    def model(self, name: str) -> ModelMetrics:
        """The per-request instruments of requests for the model `name` (shared by every model of a label)."""
        label = self.label(name)
        found = self._models.get(label)
        if found is None:
            found = ModelMetrics(
                finished={outcome: self.requests_finished.labels(label, outcome) for outcome in _OUTCOMES},
                latency={result: self.upstream_latency.labels(label, result) for result in _RESULTS},
                input_tokens=self.tokens.labels(label, "input"),
                cached_input_tokens=self.tokens.labels(label, "cached_input"),
                output_tokens=self.tokens.labels(label, "output"),
                reasoning_tokens=self.tokens.labels(label, "reasoning"),
                without_usage=self.requests_without_usage.labels(label),
            )
            self._models[label] = found
        return found

    def retried(self, model: str, code: str | None) -> None:
        self.retries.labels(self.label(model), code_label(code)).inc()

    def fell_back(self, model: str, fallback: str, reason: str) -> None:
        self.fallbacks.labels(self.label(model), self.label(fallback), reason).inc()

    def paused(self, model: str) -> None:
        self.lane_pauses.labels(self.label(model)).inc()

    def count_in_flight(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Read the requests in flight per model from `source` when scraped (the daemon's lanes)."""
        self.in_flight.source = source

    def read_limits(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Read the limit per model from `source` when scraped (the daemon's lanes)."""
        self.limits.source = source

    def limit_cut(self, model: str, reason: str) -> None:
        self.limit_cuts.labels(self.label(model), reason).inc()

    def endpoint_failed(self, model: str, endpoint: str, *, ejected: bool) -> None:
        """A call to `endpoint` (host:port) of a pool failed because of it; `ejected`: that ejected it."""
        label = self.label(model)
        self.endpoint_errors.labels(label, endpoint).inc()
        if ejected:
            self.endpoint_ejections.labels(label, endpoint).inc()

    def read_endpoints(
        self,
        in_flight: Callable[[], Mapping[tuple[str, str], int]],
        ejected: Callable[[], Mapping[tuple[str, str], int]],
    ) -> None:
        """Read the calls in flight and the ejected endpoints per (model, endpoint) of the pools when scraped."""
        self.endpoints.in_flight = in_flight
        self.endpoints.ejected = ejected


class _PerModel(Collector):
    """A gauge by model (`fusillade_requests_in_flight`, `fusillade_model_limit`), read from the daemon's lanes
    at each scrape and summed per label; a label seen once stays, at 0, so that its series does not vanish."""

    def __init__(self, label: Callable[[str], str], name: str, documentation: str) -> None:
        self.source: Callable[[], Mapping[str, int]] = dict
        self._label = label
        self._name = name
        self._documentation = documentation
        self._seen: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        counts: Tally[str] = Tally()
        for model, count in self.source().items():
            counts[self._label(model)] += count
        self._seen.update(counts)
        family = self._family()
        for label in sorted(self._seen):
            family.add_metric([label], counts[label])
        yield family

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self._name, self._documentation, labels=["model"])


class _PerEndpoint(Collector):
    """`fusillade_endpoint_in_flight` and `fusillade_endpoint_ejected`, by model and endpoint of a pool, read
    from the daemon's pools at each scrape (summed per label, a label seen once kept at 0)."""

    def __init__(self, label: Callable[[str], str]) -> None:
        self.in_flight: Callable[[], Mapping[tuple[str, str], int]] = dict
        self.ejected: Callable[[], Mapping[tuple[str, str], int]] = dict
        self._label = label
        self._seen: set[tuple[str, str]] = set()

    def collect(self) -> Iterator[Metric]:
        in_flight_family, ejected_family = self._families()
        for family, source in ((in_flight_family, self.in_flight), (ejected_family, self.ejected)):
            counts: Tally[tuple[str, str]] = Tally()
            for (model, endpoint), count in source().items():
                counts[self._label(model), endpoint] += count
            self._seen.update(counts)
            for labels in sorted(self._seen):
                family.add_metric(list(labels), counts[labels])
        yield in_flight_family
        yield ejected_family

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "fusillade_endpoint_in_flight",
                "Calls this daemon has in flight on each endpoint of a pool, by model and endpoint (host:port).",
                labels=["model", "endpoint"],
            ),
            GaugeMetricFamily(
                "fusillade_endpoint_ejected",
                "Endpoints of a pool left out now (1: ejected, or waiting for its probe), by model and endpoint; "
                "summed over the models of the default route.",
                labels=["model", "endpoint"],
            ),
        )
