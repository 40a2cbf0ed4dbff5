"""RequestQueue: claim_requests (capacities, limits, order, eligibility, concurrent claimers), maintain_queue."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import orjson
import pytest

from fusillade import clock as clocks
from fusillade.domain import ids, models, states
from fusillade.storage import base
from tests.support import backends, factories

SECOND = timedelta(seconds=1)
State = states.RequestState


def capacity(model: str, free: int, limit: int | None = None) -> models.ModelCapacity:
    return models.ModelCapacity(model=model, free=free, limit=limit)


async def test_claim_returns_what_a_daemon_needs(storage: base.Storage, clock: clocks.ManualClock) -> None:
    items = factories.templates(2, model="m1")
    batch = await factories.create_batch(storage, file=await factories.upload(storage, items=items))
    daemon = await factories.register(storage)
    clock.advance(SECOND)
    claimed = await factories.claim(storage, daemon, model="m1")
    assert [item.custom_id for item in claimed] == ["req-1", "req-2"]
    requests = await factories.all_requests(storage, batch.id)
    for item, template, request in zip(claimed, items, requests, strict=True):
        assert item.id == request.id
        assert item.batch_id == batch.id
        assert item.owner == "alice"
        assert item.model == "m1"
        assert item.method == "POST"
        assert item.url == factories.CHAT
        assert orjson.loads(item.body) == orjson.loads(template.body)
        assert item.attempt == 0
        assert item.deadline == batch.expires_at
        assert item.daemon_id == daemon
        assert item.claimed_at == clock.now()
        assert request.state is State.CLAIMED
        assert request.daemon_id == daemon
        assert request.claimed_at == clock.now()
    assert (await storage.get_batch(batch.id, owner="alice")).counts.in_progress == 2
    assert await factories.claim(storage, daemon, model="m1") == []


async def test_claim_takes_at_most_free_per_model_and_limit_in_total(storage: base.Storage) -> None:
    await factories.create_batch(
        storage,
        file=await factories.upload(
            storage, items=factories.templates(models_by_line=["m1"] * 5 + ["m2"] * 5 + ["m3"] * 5)
        ),
    )
    daemon = await factories.register(storage)
    claimed = await storage.claim_requests(
        daemon, [capacity("m1", 2), capacity("m2", 3), capacity("m3", 0), capacity("absent", 4)], limit=10
    )
    assert sorted(item.model for item in claimed) == ["m1", "m1", "m2", "m2", "m2"]
    cut = await storage.claim_requests(daemon, [capacity("m1", 5), capacity("m2", 5)], limit=4)
    assert len(cut) == 4
    assert {item.model for item in cut} <= {"m1", "m2"}
    assert await storage.claim_requests(daemon, [capacity("m3", -1)], limit=10) == []
    assert await storage.claim_requests(daemon, [], limit=10) == []
    assert await storage.claim_requests(daemon, [capacity("m3", 5)], limit=0) == []
    assert len(await storage.claim_requests(daemon, [capacity("m3", 5)], limit=10)) == 5


async def test_claim_respects_the_global_model_limit(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=10)
    first = await factories.register(storage, "a")
    second = await factories.register(storage, "b")
    assert len(await factories.claim(storage, first, 2, limit=3)) == 2
    # `second` has room for 5, but only one slot of the model's 3 is left across daemons.
    assert len(await factories.claim(storage, second, 5, limit=3)) == 1
    assert await factories.claim(storage, second, 5, limit=3) == []
    # Processing requests count as in flight too; terminal ones free their slot.
    mine = [item.id for item in await factories.claim(storage, first, 5, limit=None)]
    assert len(mine) == 5
    await factories.complete(storage, first, mine)
    assert await factories.claim(storage, second, 5, limit=3) == []
    assert await factories.claim(storage, second, 5, limit=8) != []


async def test_claim_order_earliest_deadline_then_batch_then_line(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    late = await factories.create_batch(storage, count=3, window="3h", prefix="late")
    clock.advance(SECOND)
    early = await factories.create_batch(storage, count=3, window="1h", prefix="early")
    clock.advance(SECOND)
    fifo = await factories.create_batch(storage, count=3, window="1h", prefix="fifo")
    daemon = await factories.register(storage)
    order = [(await factories.claim(storage, daemon, 1))[0].custom_id for _ in range(9)]
    assert order == [f"{prefix}-{line}" for prefix in ("early", "fifo", "late") for line in (1, 2, 3)]
    assert early.expires_at < fifo.expires_at < late.expires_at


async def test_claim_does_not_interleave_batches_of_one_deadline(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=4, prefix="a")
    await factories.create_batch(storage, count=4, prefix="b")
    daemon = await factories.register(storage)
    order = [(await factories.claim(storage, daemon, 1))[0].custom_id for _ in range(8)]
    first = order[0].split("-")[0]
    second = "b" if first == "a" else "a"
    assert order == [f"{first}-{line}" for line in range(1, 5)] + [f"{second}-{line}" for line in range(1, 5)]


async def test_claim_prefers_owners_with_fewer_in_flight(storage: base.Storage, clock: clocks.ManualClock) -> None:
    await factories.create_batch(storage, owner="alice", count=2, window="1h", prefix="alice")
    clock.advance(SECOND)
    await factories.create_batch(storage, owner="bob", count=2, window="2h", prefix="bob")
    daemon = await factories.register(storage)

    async def next_owner(owner_in_flight: dict[str, int] | None) -> str:
        [item] = await factories.claim(storage, daemon, 1, owner_in_flight=owner_in_flight)
        await storage.apply_writes(daemon, [models.Release(item.id)])
        return item.owner

    assert await next_owner(None) == "alice"
    assert await next_owner({"alice": 5}) == "bob"
    assert await next_owner({"alice": 5, "bob": 6}) == "alice"
    assert await next_owner({"bob": 1}) == "alice"
    both = await factories.claim(storage, daemon, 2, owner_in_flight={"alice": 3, "bob": 0})
    assert [item.custom_id for item in both] == ["bob-1", "bob-2"]


async def test_fair_claim_goes_by_in_flight_level_then_deadline_across_owners(storage: base.Storage) -> None:
    """Owners on one level of requests in flight share it in deadline order (interleaving their batches); a
    claim takes a busier level only once the ones before it run out, whatever that level's deadlines."""
    for owner, window, count, prefix in [
        ("carol", "3h", 2, "carol-late"),
        ("carol", "1h", 2, "carol-early"),
        ("erin", "2h", 1, "erin"),
        ("alice", "4h", 1, "alice-late"),
        ("alice", "2h", 2, "alice-mid"),
        ("bob", "5h", 1, "bob-late"),
        ("bob", "1h", 2, "bob-early"),
        ("dave", "1h", 2, "dave"),
    ]:
        await factories.create_batch(storage, owner=owner, window=window, count=count, prefix=prefix)
    daemon = await factories.register(storage)
    # carol is not in the map and erin has none in flight: both are on the first level.
    in_flight = {"alice": 2, "bob": 2, "dave": 7, "erin": 0}

    async def claim(count: int) -> set[str]:
        claimed = await factories.claim(storage, daemon, count, owner_in_flight=in_flight)
        return {item.custom_id for item in claimed}

    assert await claim(3) == {"carol-early-1", "carol-early-2", "erin-1"}
    assert await claim(4) == {"carol-late-1", "carol-late-2", "bob-early-1", "bob-early-2"}
    assert await claim(3) == {"alice-mid-1", "alice-mid-2", "alice-late-1"}
    assert await claim(5) == {"bob-late-1", "dave-1", "dave-2"}
    assert await claim(5) == set()


async def test_fair_claim_serves_a_busy_owner_holding_every_pending_request(storage: base.Storage) -> None:
    await factories.create_batch(storage, owner="alice", window="2h", count=3, prefix="late")
    await factories.create_batch(storage, owner="alice", window="1h", count=2, prefix="early")
    # bob has nothing in flight, but his requests are for another model.
    await factories.create_batch(storage, owner="bob", count=2, prefix="bob", model="model-b")
    daemon = await factories.register(storage)
    in_flight = {"alice": 50, "carol": 1}
    first = await factories.claim(storage, daemon, 3, owner_in_flight=in_flight)
    assert {item.custom_id for item in first} == {"early-1", "early-2", "late-1"}
    rest = await factories.claim(storage, daemon, 10, owner_in_flight=in_flight)
    assert {item.custom_id for item in rest} == {"late-2", "late-3"}


async def test_claim_waits_for_not_before(storage: base.Storage, clock: clocks.ManualClock) -> None:
    await factories.create_batch(storage, count=1)
    daemon = await factories.register(storage)
    [item] = await factories.claim(storage, daemon)
    await factories.start(storage, daemon, [item.id])
    await factories.apply(
        storage, daemon, models.Reschedule(request_id=item.id, not_before=clock.now() + 10 * SECOND)
    )
    assert await factories.claim(storage, daemon) == []
    clock.advance(9 * SECOND)
    assert await factories.claim(storage, daemon) == []
    clock.advance(SECOND)
    [again] = await factories.claim(storage, daemon)
    assert (again.id, again.attempt) == (item.id, 1)


async def test_claim_skips_cancelling_expired_and_deleted_batches(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    cancelling = await factories.create_batch(storage, count=2, prefix="cancelling")
    daemon = await factories.register(storage)
    held = await factories.claim(storage, daemon, 2)
    await storage.cancel_batch(cancelling.id, owner="alice")
    # A request released while its batch is cancelling is cancelled, not queued again.
    await factories.apply(storage, daemon, *(models.Release(item.id) for item in held))
    assert (await storage.get_batch(cancelling.id, owner="alice")).counts.canceled == 2
    expired = await factories.create_batch(storage, count=2, window="1h", prefix="expired")
    deleted = await factories.create_batch(storage, count=2, window="2h", prefix="deleted")
    live = await factories.create_batch(storage, count=2, window="3h", prefix="live")
    await storage.delete_batch(deleted.id, owner="alice")
    clock.advance(timedelta(hours=1))
    assert await storage.expire_batches() == [expired.id]
    claimed = await factories.claim(storage, daemon)
    assert {item.batch_id for item in claimed} == {live.id}


async def test_claim_finds_requests_reopened_by_retry(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    await factories.run_to_completion(storage, batch, failing=1)
    await storage.finalize_batches()
    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 1
    daemon = await factories.register(storage, "again")
    assert [item.custom_id for item in await factories.claim(storage, daemon)] == ["req-1"]


async def _stores(
    backend: backends.Backend, storage: base.Storage, clock: clocks.ManualClock, count: int
) -> list[base.Storage]:
    """`storage` and more instances on the same database (separate pools or connections)."""
    return [storage, *[await backend.open_store(clock) for _ in range(count - 1)]]


async def test_concurrent_claimers_get_disjoint_requests(
    backend: backends.Backend, storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=300, models_by_line=["m1", "m2"] * 150)
    stores = await _stores(backend, storage, clock, 3)
    daemons = [await factories.register(storage, f"host-{index}") for index in range(12)]
    claims = await asyncio.gather(
        *(
            stores[index % len(stores)].claim_requests(daemon, [capacity("m1", 30), capacity("m2", 30)], limit=30)
            for index, daemon in enumerate(daemons)
        )
    )
    every = [item.id for claimed in claims for item in claimed]
    # 12 claimers x 30 > 300: everything is claimed, nothing twice, and nobody gets more than its limit.
    assert len(every) == len(set(every)) == 300
    for daemon, claimed in zip(daemons, claims, strict=True):
        assert len(claimed) <= 30
        assert all(item.daemon_id == daemon for item in claimed)
    by_id = {request.id: request for request in await factories.all_requests(storage, batch.id)}
    for daemon, claimed in zip(daemons, claims, strict=True):
        assert all(by_id[item.id].daemon_id == daemon for item in claimed)


async def test_maintain_queue_runs_alongside_claims_and_itself(
    backend: backends.Backend, storage: base.Storage, clock: clocks.ManualClock
) -> None:
    """`maintain_queue` (a vacuum on PostgreSQL) may run at any time: while claims run, twice at once (from
    two stores on one database), and after it claims go on in order with nothing lost or repeated."""
    batch = await factories.create_batch(storage, count=30)
    _, other = await _stores(backend, storage, clock, 2)
    daemon = await factories.register(storage)
    first = await factories.claim(storage, daemon, 10)
    await factories.complete(storage, daemon, [item.id for item in first])
    second, _, _ = await asyncio.gather(
        factories.claim(storage, daemon, 10), storage.maintain_queue(), other.maintain_queue()
    )
    await storage.maintain_queue()
    rest = await factories.claim(storage, daemon)
    assert [item.custom_id for item in [*first, *second, *rest]] == [f"req-{line}" for line in range(1, 31)]
    counts = (await storage.get_batch(batch.id, owner="alice")).counts
    assert (counts.completed, counts.in_progress, counts.pending) == (10, 20, 0)


@pytest.mark.timeout(60)
async def test_global_model_limit_holds_under_concurrent_claimers(
    backend: backends.Backend, storage: base.Storage, clock: clocks.ManualClock
) -> None:
    limit = 5
    batch = await factories.create_batch(storage, count=60)
    stores = await _stores(backend, storage, clock, 4)
    daemons = [await factories.register(storage, f"host-{index}") for index in range(8)]
    owner_of: dict[ids.RequestId, tuple[base.Storage, ids.DaemonId]] = {}
    rng = random.Random(7)
    finished = 0
    for _ in range(100):
        claims = await asyncio.gather(
            *(
                stores[index % len(stores)].claim_requests(
                    daemon, [capacity(factories.MODEL, 10, limit)], limit=10
                )
                for index, daemon in enumerate(daemons)
            )
        )
        for index, claimed in enumerate(claims):
            for item in claimed:
                owner_of[item.id] = (stores[index % len(stores)], daemons[index])
        counts = (await storage.get_batch(batch.id, owner="alice")).counts
        assert counts.in_progress <= limit
        assert counts.in_progress == min(limit, counts.total - counts.completed), counts
        in_flight = list(owner_of)
        for request_id in rng.sample(in_flight, k=min(len(in_flight), rng.randint(2, limit))):
            store, daemon = owner_of.pop(request_id)
            await factories.complete(store, daemon, [request_id])
            finished += 1
        if finished == 60:
            break
    assert finished == 60
    assert (await storage.get_batch(batch.id, owner="alice")).counts.completed == 60


async def test_pending_models_lists_each_model_with_pending_requests_once(storage: base.Storage) -> None:
    assert await storage.pending_models() == []
    await factories.create_batch(storage, models_by_line=["m-b", "m-a", "m-b", "m-c", "m-a"])
    daemon_id = await factories.register(storage)
    await factories.claim(storage, daemon_id, model="m-c")

    assert await storage.pending_models() == ["m-a", "m-b"]
