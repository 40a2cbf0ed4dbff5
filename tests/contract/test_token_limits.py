"""RequestQueue: the token bucket of a model with `tokens_per_minute` (capacity half a second's worth, full at
first, refilled on the store's clock): a claim keeps requests in order while the bucket holds their estimates,
reports how long until the next one fits (`Claimed.token_waits`), and real usage corrects the bucket. SQLite only
for now: on PostgreSQL the configuration refuses `tokens_per_minute` (no shared token bucket yet)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import orjson
import pytest

from fusillade import clock as clocks
from fusillade.domain import ids, models
from fusillade.domain.rate_limit import estimate_tokens
from fusillade.domain.usage import Usage
from fusillade.storage import base
from tests.support import backends, factories

RATE = 60_000  # 1,000 tokens a second: a bucket of 500


@pytest.fixture(autouse=True)
def _sqlite_only(backend: backends.Backend) -> Iterator[None]:
    if backend.is_postgres:
        pytest.skip("PostgreSQL holds no token bucket yet (the configuration refuses tokens_per_minute there)")
    yield


def items(max_tokens: list[int]) -> list[models.TemplateInput]:
    return [
        models.TemplateInput(
            line_number=line,
            custom_id=f"req-{line}",
            method="POST",
            url=factories.CHAT,
            model=factories.MODEL,
            body=orjson.dumps(
                {"model": factories.MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": limit}
            ).decode(),
        )
        for line, limit in enumerate(max_tokens, start=1)
    ]


def limited(free: int = 100, rate: int | None = RATE, per_minute: int | None = None) -> models.ModelCapacity:
    return models.ModelCapacity(
        model=factories.MODEL, free=free, requests_per_minute=per_minute, tokens_per_minute=rate
    )


async def _batch(storage: base.Storage, max_tokens: list[int]) -> int:
    """A batch of one request per output limit; the estimate of each (they differ by their digits only)."""
    chosen = items(max_tokens)
    await factories.create_batch(storage, file=await factories.upload(storage, items=chosen))
    return estimate_tokens(chosen[0].body, factories.CHAT)


async def _claim(storage: base.Storage, daemon: ids.DaemonId, **options: int | None) -> models.Claimed:
    return await storage.claim_requests(daemon, [limited(**options)], limit=1000)


async def test_a_claim_keeps_requests_while_the_bucket_holds_their_estimates(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    estimate = await _batch(storage, [100] * 10)  # about 120 each: 4 fit in 500
    daemon = await factories.register(storage)

    first = await _claim(storage, daemon)
    assert len(first) == 500 // estimate == 4
    left = 500 - 4 * estimate
    assert first.token_waits == {factories.MODEL: pytest.approx((estimate - left) / 1000)}
    assert [request.custom_id for request in first] == [f"req-{line}" for line in range(1, 5)]
    assert await _claim(storage, daemon) == []  # still short: nothing claimed, and the rows stay pending

    clock.advance(timedelta(seconds=first.token_waits[factories.MODEL]))
    second = await _claim(storage, daemon)
    assert [request.custom_id for request in second] == ["req-5"]

    clock.advance(timedelta(seconds=30))  # refilled to the capacity, not beyond
    assert len(await _claim(storage, daemon)) == 4


async def test_a_request_larger_than_the_bucket_passes_when_it_is_full_and_the_next_waits_for_it(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    estimate = await _batch(storage, [2_000, 2_001])
    daemon = await factories.register(storage)
    first = await _claim(storage, daemon)
    assert len(first) == 1
    assert first.token_waits[factories.MODEL] == pytest.approx(estimate / 1000)  # back to full: 500 - level
    clock.advance(timedelta(seconds=estimate / 1000 - 0.01))
    assert await _claim(storage, daemon) == []
    clock.advance(timedelta(seconds=0.02))
    assert len(await _claim(storage, daemon)) == 1


async def test_real_usage_corrects_the_bucket_and_a_release_gives_the_estimate_back(
    storage: base.Storage,
) -> None:
    estimate = await _batch(storage, [100] * 10)
    daemon = await factories.register(storage)
    first = await _claim(storage, daemon)
    assert len(first) == 4
    # The first answer used 10 tokens, not `estimate`: the difference comes back, enough for one more request.
    small = factories.complete_spending(first[0], Usage(input_tokens=5, output_tokens=5))
    await factories.apply(storage, daemon, models.MarkProcessing(first[0].id))
    await factories.apply(storage, daemon, small)
    assert 500 - 4 * estimate + estimate - 10 >= estimate
    assert [request.custom_id for request in await _claim(storage, daemon)] == ["req-5"]
    assert await _claim(storage, daemon) == []
    # An answer without usage keeps the estimate; a release (never sent) gives it back.
    await factories.apply(storage, daemon, factories.complete_spending(first[1], None))
    assert await _claim(storage, daemon) == []
    await factories.apply(storage, daemon, models.Release(first[2].id))
    assert len(await _claim(storage, daemon)) == 1


async def test_usage_above_the_estimate_takes_the_bucket_below_zero(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    estimate = await _batch(storage, [100] * 10)
    daemon = await factories.register(storage)
    first = await _claim(storage, daemon, free=1)
    big = factories.complete_spending(first[0], Usage(input_tokens=1_000, output_tokens=500 + estimate))
    await factories.apply(storage, daemon, big)  # 1,500 tokens more than estimated: the level near -1,000
    clock.advance(timedelta(seconds=1.0))
    claimed = await _claim(storage, daemon)
    assert claimed == []
    assert claimed.token_waits[factories.MODEL] > 0.0
    clock.advance(timedelta(seconds=claimed.token_waits[factories.MODEL]))
    assert len(await _claim(storage, daemon)) == 1


async def test_both_limits_hold_and_a_model_without_a_token_limit_reports_no_wait(storage: base.Storage) -> None:
    await _batch(storage, [100] * 10)
    daemon = await factories.register(storage)
    both = await _claim(storage, daemon, per_minute=240)  # a request bucket of 2: it cuts first
    assert len(both) == 2
    assert both.token_waits == {}
    unlimited = await _claim(storage, daemon, rate=None)
    assert len(unlimited) == 8
    assert unlimited.token_waits == {}


async def test_writes_then_claim_correct_before_claiming(storage: base.Storage) -> None:
    await _batch(storage, [100] * 10)
    daemon = await factories.register(storage)
    first = await _claim(storage, daemon)
    writes = [factories.complete_spending(request, Usage(input_tokens=1)) for request in first]
    report, claimed = await storage.apply_writes_and_claim(daemon, writes, [limited()], limit=100)
    assert report.applied == {request.id for request in first}
    assert len(claimed) == 4  # the four estimates came back before the claim
