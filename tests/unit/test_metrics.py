"""The daemon's metrics take label values only from the routing table and fixed sets (`fusillade.metrics`), and
the daemon counts the tokens of the completions it wrote, once each, when the write applied."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fusillade.clock import ManualClock
from fusillade.daemon.executor import ProcessingMarks, RequestExecutor
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.pending_writes import PendingWrites
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import ids, models, states
from fusillade.domain.usage import Usage
from fusillade.metrics import DEFAULT_ROUTE_LABEL, DaemonMetrics, code_label
from fusillade.upstream import outcome
from fusillade.upstream.routes import Route


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


def tokens(metrics: DaemonMetrics, model: str) -> dict[str, float | None]:
    kinds = ("input", "cached_input", "output", "reasoning")
    found = {
        kind: metrics.registry.get_sample_value("fusillade_tokens_total", {"model": model, "kind": kind})
        for kind in kinds
    }
    found["without_usage"] = metrics.registry.get_sample_value(
        "fusillade_requests_without_usage_total", {"model": model}
    )
    return found


def test_tokens_are_counted_by_model_label_and_kind() -> None:
    metrics = DaemonMetrics(CollectorRegistry())
    metrics.use_routes(["gpt-4o"])
    metrics.model("gpt-4o").spent(Usage(input_tokens=100, cached_tokens=20, output_tokens=50, reasoning_tokens=10))
    metrics.model("gpt-4o").spent(Usage(input_tokens=1, output_tokens=2))
    metrics.model("alice-secret-project").spent(Usage(input_tokens=7, output_tokens=3))
    metrics.model("bob-secret-project").spent(None)
    metrics.model("bob-secret-project").spent(Usage())

    assert tokens(metrics, "gpt-4o") == {
        "input": 101,
        "cached_input": 20,
        "output": 52,
        "reasoning": 10,
        "without_usage": 0,
    }
    assert tokens(metrics, DEFAULT_ROUTE_LABEL) == {
        "input": 7,
        "cached_input": 0,
        "output": 3,
        "reasoning": 0,
        "without_usage": 1,
    }
    text = generate_latest(metrics.registry).decode()
    assert "secret" not in text


# ------------------------------------------------------------------------- what the daemon's executor counts


class Answers:
    """An upstream that answers every call with `result`."""

    def __init__(self, result: outcome.Outcome) -> None:
        self.result = result

    async def send(
        self,
        request: models.ClaimedRequest,
        route: Route,
        *,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> outcome.Outcome:
        return self.result


def claimed(clock: ManualClock, model: str) -> models.ClaimedRequest:
    return models.ClaimedRequest(
        id=ids.new_request_id(),
        batch_id=ids.new_batch_id(),
        owner="alice",
        custom_id="c1",
        model=model,
        method="POST",
        url="/v1/chat/completions",
        body="{}",
        attempt=0,
        deadline=clock.now() + DaemonSettings().claim_max_age * 10,
        daemon_id=ids.new_daemon_id(),
        claimed_at=clock.now(),
    )


async def complete(
    metrics: DaemonMetrics, writes: PendingWrites, result: outcome.Outcome, *, model: str = "gpt-4o"
) -> models.ClaimedRequest:
    """Run one call through a real executor up to its submitted write (not committed yet)."""
    clock = ManualClock()
    lanes = Lanes({"gpt-4o": Route(base_url="http://127.0.0.1:9")}, default=Route(base_url="http://127.0.0.1:9"))
    lanes.learn([model])
    executor = RequestExecutor(
        client=Answers(result),
        lanes=lanes,
        writes=writes,
        marks=ProcessingMarks(writes),
        settings=DaemonSettings(),
        clock=clock,
        metrics=metrics,
        on_retry_scheduled=lambda _: None,
        on_lane_paused=lambda: None,
    )
    request = claimed(clock, model)
    await executor.execute(request, headers=None, abort_reason=lambda: None, finished=lambda: None)
    return request


USAGE = Usage(input_tokens=30, cached_tokens=10, output_tokens=20, reasoning_tokens=5)


@pytest.mark.parametrize("usage", [USAGE, None], ids=["usage", "no usage"])
async def test_a_completion_counts_its_tokens_once_its_write_applied(usage: Usage | None) -> None:
    metrics = DaemonMetrics(CollectorRegistry())
    metrics.use_routes(["gpt-4o"])
    writes = PendingWrites(max_size=10, on_arrival=lambda: None)
    request = await complete(metrics, writes, outcome.Success(status_code=200, body="{}", usage=usage))
    group = writes.take_group()
    assert tokens(metrics, "gpt-4o")["input"] in (None, 0)  # nothing counted before the commit

    writes.settle(group, models.WriteReport(applied=frozenset({request.id})))

    expected = {"input": 0, "cached_input": 0, "output": 0, "reasoning": 0, "without_usage": 1}
    if usage is not None:
        expected = {"input": 30, "cached_input": 10, "output": 20, "reasoning": 5, "without_usage": 0}
    assert tokens(metrics, "gpt-4o") == expected
    completed = {"model": "gpt-4o", "outcome": "completed"}
    assert metrics.registry.get_sample_value("fusillade_requests_finished_total", completed) == 1


async def test_a_refused_completion_counts_no_tokens_and_a_retried_one_counts_once() -> None:
    metrics = DaemonMetrics(CollectorRegistry())
    metrics.use_routes(["gpt-4o"])
    writes = PendingWrites(max_size=10, on_arrival=lambda: None)
    success = outcome.Success(status_code=200, body="{}", usage=USAGE)
    refused = await complete(metrics, writes, success)
    writes.settle(writes.take_group(), models.WriteReport(conflicts={refused.id: states.RequestState.CANCELED}))
    assert tokens(metrics, "gpt-4o")["input"] == 0

    # A group whose transaction failed is retried; found completed then, its first commit went through unheard.
    retried = await complete(metrics, writes, success)
    writes.put_back(writes.take_group())
    completed = models.WriteReport(conflicts={retried.id: states.RequestState.COMPLETED})
    writes.settle(writes.take_group(), completed)

    assert tokens(metrics, "gpt-4o") == {
        "input": 30,
        "cached_input": 10,
        "output": 20,
        "reasoning": 5,
        "without_usage": 0,
    }


async def test_a_model_without_a_route_of_its_own_counts_under_the_default_label() -> None:
    metrics = DaemonMetrics(CollectorRegistry())
    metrics.use_routes(["gpt-4o"])
    writes = PendingWrites(max_size=10, on_arrival=lambda: None)
    success = outcome.Success(status_code=200, body="{}", usage=USAGE)
    request = await complete(metrics, writes, success, model="alice-secret-project")
    writes.settle(writes.take_group(), models.WriteReport(applied=frozenset({request.id})))
    assert tokens(metrics, DEFAULT_ROUTE_LABEL)["output"] == 20
    assert "alice" not in generate_latest(metrics.registry).decode()
