"""Prometheus metrics of the daemon. Each `DaemonMetrics` registers its instruments on the registry it is
given, so a test (or a process running two daemons) can keep its own; the HTTP API exposes the registry.

Label values are bounded: models come from the routing table, outcomes and reasons from fixed sets. Owners
and custom ids never become labels."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_DATABASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_SIZE_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000)


_OUTCOMES = ("completed", "failed", "canceled")
_RESULTS = ("success", "retriable", "permanent", "expired")


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """The per-request instruments of one model, labelled once (a label lookup per request would cost more
    than the update itself)."""

    in_flight: Gauge
    finished: dict[str, Counter]
    """By outcome: completed, failed, canceled."""
    latency: dict[str, Histogram]
    """By result: success, retriable, permanent, expired."""


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._models: dict[str, ModelMetrics] = {}
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_finished = Counter(
            "fusillade_requests_finished",
            "Requests that reached a final outcome in this daemon, by model and outcome "
            "(completed, failed, canceled).",
            ["model", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "fusillade_request_retries",
            "Attempts that failed with a retriable error and were scheduled again, by model and error code.",
            ["model", "code"],
            registry=r,
        )
        self.in_flight = Gauge(
            "fusillade_requests_in_flight", "Requests this daemon is working on, by model.", ["model"], registry=r
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
        self.rows_purged = Counter(
            "fusillade_rows_purged", "Rows of deleted batches and files removed for good.", registry=r
        )
        self.lane_pauses = Counter(
            "fusillade_model_pauses",
            "Times a model's lane was paused because its upstream answered 429.",
            ["model"],
            registry=r,
        )
        self.database_errors = Counter(
            "fusillade_database_errors",
            "Database calls of the daemon that failed and were retried, by task.",
            ["task"],
            registry=r,
        )

    def model(self, name: str) -> ModelMetrics:
        found = self._models.get(name)
        if found is None:
            found = ModelMetrics(
                in_flight=self.in_flight.labels(name),
                finished={outcome: self.requests_finished.labels(name, outcome) for outcome in _OUTCOMES},
                latency={result: self.upstream_latency.labels(name, result) for result in _RESULTS},
            )
            self._models[name] = found
        return found
