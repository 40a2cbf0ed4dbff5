"""RequestQueue.apply_writes_and_claim: the daemon's tick, writes first and then the claim, in one trip."""

from __future__ import annotations

import pytest

from fusillade import errors
from fusillade.domain import models, states
from fusillade.storage import base
from tests.support import factories

State = states.RequestState


def _capacity(free: int, limit: int | None = None) -> list[models.ModelCapacity]:
    return [models.ModelCapacity(model=factories.MODEL, free=free, limit=limit)]


async def test_the_claim_sees_the_slots_its_writes_freed(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=3)
    daemon = await factories.register(storage)
    [first] = await factories.claim(storage, daemon, 1, limit=1)

    # Under a global limit of 1 the claim gets the next request only because the completion went first.
    report, claimed = await storage.apply_writes_and_claim(
        daemon, [models.Complete(first.id, 200, '{"ok": true}')], _capacity(1, limit=1), limit=1
    )

    assert report.applied == {first.id}
    assert [request.custom_id for request in claimed] == ["req-2"]
    states_by_id = {
        request.custom_id: request.state for request in await factories.all_requests(storage, batch.id)
    }
    assert states_by_id == {"req-1": State.COMPLETED, "req-2": State.CLAIMED, "req-3": State.PENDING}


async def test_refused_writes_are_reported_and_the_claim_still_runs(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)
    [first] = await factories.claim(storage, daemon, 1)
    await factories.apply(storage, daemon, models.Complete(first.id, 200, "{}"))

    report, claimed = await storage.apply_writes_and_claim(
        daemon, [models.Fail(request_id=first.id, code="timeout", message="late")], _capacity(5), limit=5
    )

    assert report.applied == frozenset()
    assert report.conflicts == {first.id: State.COMPLETED}
    assert [request.custom_id for request in claimed] == ["req-2"]


async def test_either_part_may_be_empty(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)

    report, claimed = await storage.apply_writes_and_claim(daemon, [], _capacity(1), limit=1)
    assert report == models.WriteReport()
    [first] = claimed
    assert first.custom_id == "req-1"

    report, claimed = await storage.apply_writes_and_claim(
        daemon, [models.Complete(first.id, 200, "{}")], [], limit=0
    )
    assert report.applied == {first.id}
    assert claimed == []
    states_by_id = {
        request.custom_id: request.state for request in await factories.all_requests(storage, batch.id)
    }
    assert states_by_id == {"req-1": State.COMPLETED, "req-2": State.PENDING}


async def test_a_dead_daemon_may_not_claim_but_its_writes_stay_applied(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)
    [first] = await factories.claim(storage, daemon, 1)
    await storage.mark_daemon_dead(daemon)

    with pytest.raises(errors.StateConflict):
        await storage.apply_writes_and_claim(daemon, [models.Complete(first.id, 200, "{}")], _capacity(1), limit=1)

    states_by_id = {
        request.custom_id: request.state for request in await factories.all_requests(storage, batch.id)
    }
    assert states_by_id == {"req-1": State.COMPLETED, "req-2": State.PENDING}


async def test_two_writes_for_one_request_are_refused(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=1)
    daemon = await factories.register(storage)
    [first] = await factories.claim(storage, daemon, 1)
    writes = [models.MarkProcessing(first.id), models.Complete(first.id, 200, "{}")]
    with pytest.raises(ValueError, match=r"[Tt]wo writes for"):
        await storage.apply_writes_and_claim(daemon, writes, _capacity(1), limit=1)
