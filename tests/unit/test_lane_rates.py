"""The lanes' mirror of a rate-limited model's bucket: what a claim may ask for, when the tick must wake, and the
level a claim's answer reports (times are monotonic seconds passed in)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fusillade.daemon.lanes import Lanes
from fusillade.domain import ids, models
from fusillade.upstream.routes import Route

RATE = 600  # 10 a second, a bucket of 5


def lanes(rate: int | None = RATE, concurrency: int = 16) -> Lanes:
    return Lanes({"a": Route(base_url="http://x", concurrency=concurrency, requests_per_minute=rate)})


def answer(count: int, level: float | None) -> models.Claimed:
    claimed = models.Claimed()
    for _ in range(count):
        claimed.append(_request())
    if level is not None:
        claimed.buckets = {"a": level}
    return claimed


def _request() -> models.ClaimedRequest:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return models.ClaimedRequest(
        id=ids.new_request_id(),
        batch_id=ids.new_batch_id(),
        owner="o",
        custom_id="c",
        model="a",
        method="POST",
        url="/v1/chat/completions",
        body="{}",
        attempt=0,
        deadline=now,
        daemon_id=ids.new_daemon_id(),
        claimed_at=now,
    )


def test_a_claim_asks_for_at_most_the_tokens_and_carries_the_rate() -> None:
    lane = lanes()
    assert lane.any_rated
    (capacity,) = lane.capacities(0.0)
    assert (capacity.free, capacity.requests_per_minute) == (5, RATE)
    assert lanes(concurrency=3).capacities(0.0)[0].free == 3  # the slots, when fewer


def test_tokens_asked_for_are_spent_until_the_answer_which_sets_the_level() -> None:
    lane = lanes()
    capacities = lane.capacities(0.0)
    lane.spend_ahead(capacities, 0.0)
    assert lane.capacities(0.0) == []  # a second claim under way may not ask for them again
    assert lane.next_resume() == pytest.approx(0.1)  # a tenth of a second's worth (one token) back

    lane.claim_answered(capacities, answer(2, level=0.0), 0.0)  # others took the rest of the shared bucket
    assert lane.capacities(0.05) == []
    assert lane.capacities(0.1)[0].free == 1

    lane.claim_answered(capacities, None, 0.1)  # a failed claim gives back what it spent ahead
    assert lane.capacities(0.1)[0].free == 5


def test_without_a_reported_level_the_claimed_requests_are_spent() -> None:
    lane = lanes()
    capacities = lane.capacities(0.0)
    lane.spend_ahead(capacities, 0.0)
    lane.claim_answered(capacities, answer(3, level=None), 0.0)
    assert lane.capacities(0.0)[0].free == 2


def test_a_full_bucket_asks_for_no_wake_and_a_lane_without_a_rate_has_no_bucket() -> None:
    lane = lanes()
    lane.capacities(0.0)
    assert lane.next_resume() is None
    plain = lanes(rate=None)
    assert not plain.any_rated
    (capacity,) = plain.capacities(0.0)
    assert (capacity.free, capacity.requests_per_minute) == (16, None)
    assert plain.next_resume() is None


def test_a_reload_changes_the_rate_or_removes_the_bucket() -> None:
    lane = lanes()
    lane.capacities(0.0)
    lane.replace_routes({"a": Route(base_url="http://x", concurrency=16, requests_per_minute=120)})
    assert lane.capacities(0.0)[0].free == 1  # the new bucket's size
    lane.replace_routes({"a": Route(base_url="http://x", concurrency=16)})
    assert not lane.any_rated
    assert lane.capacities(0.0)[0].free == 16
