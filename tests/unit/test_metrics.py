"""The daemon's metrics take label values only from the routing table and fixed sets (`fusillade.metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fusillade.metrics import DEFAULT_ROUTE_LABEL, DaemonMetrics, code_label


def label_values(registry: CollectorRegistry, label: str) -> set[str]:
    text = generate_latest(registry).decode()
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if label in sample.labels
    }


def metrics_after(tenant_names: list[str]) -> DaemonMetrics:
    """Metrics of a daemon routing `gpt-4o` and `llama`, after a request of each of `tenant_names` (default route)
    and two of `gpt-4o`, each finished, timed, retried and pausing its lane, with one more in flight."""
    metrics = DaemonMetrics(CollectorRegistry())
    metrics.use_routes(["gpt-4o", "llama"])
    in_flight = {name: 1 for name in tenant_names} | {"gpt-4o": 1}
    metrics.count_in_flight(lambda: in_flight)
    for name in [*tenant_names, "gpt-4o", "gpt-4o"]:
        metrics.model(name).finished["completed"].inc()
        metrics.model(name).latency["success"].observe(0.1)
        metrics.retried(name, "http_429")
        metrics.paused(name)
    return metrics


def test_models_without_a_route_of_their_own_share_the_default_label() -> None:
    tenant_names = [f"alice-secret-project-{n}" for n in range(500)]
    metrics = metrics_after(tenant_names)

    assert label_values(metrics.registry, "model") == {"gpt-4o", DEFAULT_ROUTE_LABEL}
    registry = metrics.registry
    assert registry.get_sample_value("fusillade_requests_in_flight", {"model": DEFAULT_ROUTE_LABEL}) == 500
    assert registry.get_sample_value("fusillade_requests_in_flight", {"model": "gpt-4o"}) == 1
    completed = {"model": DEFAULT_ROUTE_LABEL, "outcome": "completed"}
    assert registry.get_sample_value("fusillade_requests_finished_total", completed) == 500
    text = generate_latest(registry).decode()
    assert "alice" not in text
    assert len(text) < len(generate_latest(metrics_after(tenant_names[:1]).registry)) + 200


def test_a_route_added_by_a_reload_gets_its_own_label_from_then_on() -> None:
    metrics = DaemonMetrics(CollectorRegistry())
    metrics.model("late").finished["failed"].inc()
    metrics.use_routes(["late"])
    metrics.model("late").finished["failed"].inc()
    failed = "fusillade_requests_finished_total"
    assert metrics.registry.get_sample_value(failed, {"model": DEFAULT_ROUTE_LABEL, "outcome": "failed"}) == 1
    assert metrics.registry.get_sample_value(failed, {"model": "late", "outcome": "failed"}) == 1


def test_in_flight_keeps_a_label_once_seen_at_zero() -> None:
    metrics = DaemonMetrics(CollectorRegistry())
    metrics.use_routes(["model-a"])
    in_flight = {"model-a": 3}
    metrics.count_in_flight(lambda: in_flight)
    assert metrics.registry.get_sample_value("fusillade_requests_in_flight", {"model": "model-a"}) == 3
    in_flight.clear()
    assert metrics.registry.get_sample_value("fusillade_requests_in_flight", {"model": "model-a"}) == 0


def test_retry_codes_map_to_a_fixed_set() -> None:
    assert [code_label(code) for code in ("http_429", "http_503", "timeout", "connection_error")] == [
        "http_429",
        "http_503",
        "timeout",
        "connection_error",
    ]
    assert code_label("http_599") == code_label("http_555") == "http_5xx"
    assert code_label("http_418") == "http_other"
    assert code_label(None) == code_label("anything-a-tenant-wrote") == "other"
    everything = {code_label(f"http_{status}") for status in range(100, 1000)}
    assert len(everything) <= 10
