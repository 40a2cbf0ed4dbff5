"""The daemon's pure decisions: which state write an upstream outcome calls for, and what each model's lane
lets start now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fusillade.daemon.backoff import Backoff
from fusillade.daemon.executor import decide_write
from fusillade.daemon.lanes import Lanes
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import ids, models
from fusillade.domain.retry import RetryPolicy
from fusillade.domain.usage import Usage
from fusillade.upstream import outcome
from fusillade.upstream.routes import Route

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_delay=timedelta(seconds=1), jitter=0.0, max_attempts=3)


def claimed(
    *, attempt: int = 0, deadline: datetime = NOW + timedelta(hours=1), model: str = "m", owner: str = "alice"
) -> models.ClaimedRequest:
    return models.ClaimedRequest(
        id=ids.new_request_id(),
        batch_id=ids.new_batch_id(),
        owner=owner,
        custom_id="c1",
        model=model,
        method="POST",
        url="/v1/chat/completions",
        body="{}",
        attempt=attempt,
        deadline=deadline,
        daemon_id=ids.new_daemon_id(),
        claimed_at=NOW,
    )


def test_success_completes_with_the_body() -> None:
    request = claimed()
    decision = decide_write(
        request,
        outcome.Success(status_code=200, body='{"ok":1}', usage=Usage(input_tokens=3, output_tokens=1)),
        policy=POLICY,
        now=NOW,
        random_value=0.5,
    )
    spend = models.Spend(request.batch_id, request.owner, request.model, Usage(input_tokens=3, output_tokens=1))
    assert decision.write == models.Complete(request.id, 200, '{"ok":1}', spend)
    assert decision.retry_at is None


def test_permanent_failure_fails_with_the_response() -> None:
    request = claimed()
    result = outcome.Permanent(code="http_400", message="bad", status_code=400, body='{"error":{}}')
    decision = decide_write(request, result, policy=POLICY, now=NOW, random_value=0.5)
    assert decision.write == models.Fail(
        request_id=request.id, code="http_400", message="bad", status_code=400, body='{"error":{}}'
    )


def test_retriable_failure_is_rescheduled_after_the_backoff() -> None:
    request = claimed(attempt=1)
    result = outcome.Retriable(code="http_503", message="down", status_code=503)
    decision = decide_write(request, result, policy=POLICY, now=NOW, random_value=0.5)
    assert isinstance(decision.write, models.Reschedule)
    assert decision.write.not_before == NOW + timedelta(seconds=2)
    assert decision.retry_at == NOW + timedelta(seconds=2)
    assert decision.write.code == "http_503"


def test_retry_after_is_a_floor_for_the_next_attempt() -> None:
    request = claimed()
    result = outcome.Retriable(
        code="http_429", message="slow down", status_code=429, retry_after=timedelta(seconds=30)
    )
    decision = decide_write(request, result, policy=POLICY, now=NOW, random_value=0.5)
    assert isinstance(decision.write, models.Reschedule)
    assert decision.write.not_before == NOW + timedelta(seconds=30)


def test_retries_stop_at_max_attempts_and_keep_the_last_response() -> None:
    request = claimed(attempt=2)
    result = outcome.Retriable(code="http_500", message="boom", status_code=500, body='{"e":1}')
    decision = decide_write(request, result, policy=POLICY, now=NOW, random_value=0.5)
    assert isinstance(decision.write, models.Fail)
    assert decision.write.status_code == 500 and decision.write.body == '{"e":1}'
    assert decision.write.message == "boom (gave up after 3 attempts)"
    assert decision.gave_up == "max_attempts"


def test_no_retry_starts_past_the_deadline() -> None:
    request = claimed(deadline=NOW + timedelta(seconds=10))
    result = outcome.Retriable(code="timeout", message="no first byte", retry_after=timedelta(seconds=20))
    decision = decide_write(request, result, policy=POLICY, now=NOW, random_value=0.5)
    assert isinstance(decision.write, models.Fail)
    assert decision.write.code == "timeout"
    assert decision.gave_up == "deadline"


def test_lanes_offer_what_each_model_can_start() -> None:
    lanes = Lanes({"a": Route(base_url="http://x", concurrency=2), "b": Route(base_url="http://x", concurrency=1)})
    first, second = claimed(model="a"), claimed(model="b", owner="bob")
    lanes.started(first)
    lanes.started(second)
    assert lanes.capacities(0.0) == [models.ModelCapacity(model="a", free=1, limit=2)]
    assert lanes.owners_in_flight() == {"alice": 1, "bob": 1}
    lanes.finished(second)
    assert [c.model for c in lanes.capacities(0.0)] == ["a", "b"]
    assert lanes.owners_in_flight() == {"alice": 1}
    assert lanes.in_flight() == 1


def test_a_paused_lane_offers_nothing_until_it_resumes() -> None:
    lanes = Lanes({"a": Route(base_url="http://x", concurrency=4)})
    assert lanes.pause("a", until=10.0)
    assert not lanes.pause("a", until=5.0)  # an earlier end does not shorten the pause
    assert lanes.capacities(9.9) == []
    assert lanes.next_resume() == 10.0
    assert [c.model for c in lanes.capacities(10.0)] == ["a"]
    assert lanes.next_resume() is None


def test_replacing_routes_changes_limits_without_losing_counts() -> None:
    lanes = Lanes({"a": Route(base_url="http://x", concurrency=4)})
    request = claimed(model="a")
    lanes.started(request)
    lanes.replace_routes({"a": Route(base_url="http://x", concurrency=1)})
    assert lanes.capacities(0.0) == []
    lanes.replace_routes({"a": Route(base_url="http://x", concurrency=3)})
    assert lanes.capacities(0.0) == [models.ModelCapacity(model="a", free=2, limit=3)]


def test_an_adaptive_lane_starts_at_its_floor_and_keeps_what_it_found_across_a_reload() -> None:
    route = Route(base_url="http://x", concurrency=32, adaptive=True, min_concurrency=2)
    lanes = Lanes({"a": route})
    assert lanes.capacities(0.0) == [models.ModelCapacity(model="a", free=2, limit=2)]
    for step in range(40):  # calls succeed at the same latency with the lane full: slow start grows it
        lanes.succeeded("a", sent_at=step, in_flight=lanes.limits()["a"], now=step + 0.1)
    found = lanes.limits()["a"]
    assert found > 10
    lanes.replace_routes({"a": Route(base_url="http://y", concurrency=64, adaptive=True, min_concurrency=2)})
    assert lanes.limits() == {"a": found}
    lanes.replace_routes({"a": Route(base_url="http://y", concurrency=8, adaptive=True)})
    assert lanes.limits() == {"a": 8}  # within the new ceiling
    assert lanes.overloaded("a", sent_at=100.0, now=100.1)
    assert lanes.limits()["a"] < 8
    lanes.replace_routes({"a": Route(base_url="http://y", concurrency=5)})  # fixed again
    assert lanes.limits() == {"a": 5}
    assert not lanes.overloaded("a", sent_at=200.0, now=200.1)  # a fixed limit is never cut
    assert not lanes.is_adaptive("a")


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(first=0.1, cap=0.4, jitter=0.0)
    assert [backoff.failed() for _ in range(4)] == [0.1, 0.2, 0.4, 0.4]
    assert backoff.failures == 4
    backoff.succeeded()
    assert backoff.failed() == 0.1


def test_settings_refuse_a_stale_threshold_shorter_than_the_heartbeat() -> None:
    with pytest.raises(ValueError, match="stale_after"):
        DaemonSettings(heartbeat_interval=timedelta(seconds=10), stale_after=timedelta(seconds=5))
