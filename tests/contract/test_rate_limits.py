"""RequestQueue: the request bucket of a model with `requests_per_minute` (capacity half a second's worth, full
at first, refilled on the store's clock), shared by every claimer of the database, told in `Claimed.buckets`."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from fusillade import clock as clocks
from fusillade.domain import ids, models
from fusillade.storage import base
from tests.support import backends, factories

RATE = 600  # 10 a second: a bucket of 5


def rated(free: int, model: str = factories.MODEL, rate: int | None = RATE) -> models.ModelCapacity:
    return models.ModelCapacity(model=model, free=free, limit=None, requests_per_minute=rate)


async def _claim(store: base.RequestQueue, daemon: ids.DaemonId, free: int = 100) -> models.Claimed:
    return await store.claim_requests(daemon, [rated(free)], limit=1000)


async def test_a_claim_takes_at_most_the_buckets_tokens_and_reports_its_level(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    await factories.create_batch(storage, count=40)
    daemon = await factories.register(storage)

    first = await _claim(storage, daemon)
    assert len(first) == 5
    assert first.buckets == {factories.MODEL: pytest.approx(0.0, abs=1e-5)}
    assert await _claim(storage, daemon) == []

    clock.advance(timedelta(milliseconds=250))  # 2.5 tokens back
    second = await _claim(storage, daemon)
    assert len(second) == 2
    assert second.buckets[factories.MODEL] == pytest.approx(0.5, abs=1e-5)

    clock.advance(timedelta(seconds=30))  # refilled to the capacity, not beyond
    assert len(await _claim(storage, daemon)) == 5


async def test_the_tokens_are_spent_on_what_was_claimed_only(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)
    claimed = await _claim(storage, daemon)
    assert len(claimed) == 2
    assert claimed.buckets[factories.MODEL] == pytest.approx(3.0, abs=1e-5)
    # Fewer free slots than tokens: the slots cut, the rest of the bucket stays.
    await factories.create_batch(storage, count=10)
    assert len(await _claim(storage, daemon, free=1)) == 1
    assert len(await _claim(storage, daemon)) == 2


async def test_a_capacity_without_a_rate_is_not_limited_and_reports_no_bucket(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=20)
    daemon = await factories.register(storage)
    claimed = await storage.claim_requests(daemon, [rated(20, rate=None)], limit=100)
    assert len(claimed) == 20
    assert claimed.buckets == {}


async def test_each_model_has_its_own_bucket(storage: base.Storage) -> None:
    await factories.create_batch(
        storage,
        file=await factories.upload(storage, items=factories.templates(models_by_line=["a"] * 8 + ["b"] * 8)),
    )
    daemon = await factories.register(storage)
    claimed = await storage.claim_requests(
        daemon, [rated(8, "a", rate=120), rated(8, "b", rate=None)], limit=100
    )  # a: a bucket of 1
    assert sorted(item.model for item in claimed) == ["a"] + ["b"] * 8
    assert set(claimed.buckets) == {"a"}


async def test_writes_then_claim_spend_from_the_same_bucket(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    await factories.create_batch(storage, count=12)
    daemon = await factories.register(storage)
    first = await _claim(storage, daemon)
    writes = [models.Release(item.id) for item in first]
    clock.advance(timedelta(milliseconds=100))
    report, claimed = await storage.apply_writes_and_claim(daemon, writes, [rated(100)], limit=100)
    assert report.applied == {item.id for item in first}
    # The requests given back are pending again, but only one token came back in 100 ms: no refund.
    assert len(claimed) == 1
    assert claimed.buckets[factories.MODEL] == pytest.approx(0.0, abs=1e-5)


async def test_claimers_on_separate_connections_share_the_bucket(
    backend: backends.Backend, storage: base.Storage, clock: clocks.ManualClock
) -> None:
    if not backend.is_postgres:
        pytest.skip("on SQLite one process claims: its store holds the bucket")
    await factories.create_batch(storage, count=200)
    stores = [storage, *[await backend.open_store(clock) for _ in range(2)]]
    daemons = [await factories.register(storage, f"host-{index}") for index in range(6)]
    for _ in range(3):
        claims = await asyncio.gather(
            *(_claim(stores[index % len(stores)], daemon) for index, daemon in enumerate(daemons))
        )
        assert sum(len(claimed) for claimed in claims) == 5
        every = [item.id for claimed in claims for item in claimed]
        assert len(set(every)) == 5
        clock.advance(timedelta(milliseconds=500))
    # A claimer whose clock is behind refills nothing, and does not move the bucket's time back.
    behind = await backend.open_store(clocks.ManualClock(clock.now() - timedelta(milliseconds=600)))
    assert await _claim(behind, daemons[0]) == []
    assert len(await _claim(storage, daemons[0])) == 5
