"""Token usage sums: added with the `Complete` writes that apply, in their transaction; read with the batch, by
model; a request completed twice (a reclaim) counts once; a batch's model."""

from __future__ import annotations

from datetime import timedelta

from fusillade import clock as clocks
from fusillade.domain import models
from fusillade.domain.usage import Usage
from fusillade.storage import base
from tests.support import factories

SECOND = timedelta(seconds=1)


def _complete(request: models.ClaimedRequest, usage: Usage | None) -> models.Complete:
    spend = models.Spend(request.batch_id, request.owner, request.model, usage)
    return models.Complete(request.id, 200, factories.response_body(request.id), spend)


async def test_the_usage_of_completed_requests_is_summed_by_model(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, models_by_line=["model-a", "model-a", "model-b", "model-a"])
    assert batch.model is None  # the file mixes models
    assert batch.usage == () and batch.total_usage == Usage() and batch.usage_unknown == 0
    daemon = await factories.register(storage)
    claimed = [
        *await factories.claim(storage, daemon, model="model-a"),
        *await factories.claim(storage, daemon, model="model-b"),
    ]
    by_line = {request.custom_id: request for request in claimed}
    await factories.apply(
        storage,
        daemon,
        _complete(by_line["req-1"], Usage(input_tokens=10, cached_tokens=4, output_tokens=3, reasoning_tokens=1)),
        _complete(by_line["req-2"], Usage(input_tokens=7, output_tokens=5)),
        _complete(by_line["req-3"], Usage(input_tokens=100, output_tokens=1)),
    )
    # A later tick: its sums add to the same rows.
    await factories.apply(storage, daemon, _complete(by_line["req-4"], None))
    found = await storage.get_batch(batch.id, owner=factories.OWNER)
    assert found.usage == (
        models.ModelUsage(
            model="model-a",
            requests=2,
            unknown=1,
            usage=Usage(input_tokens=17, cached_tokens=4, output_tokens=8, reasoning_tokens=1),
        ),
        models.ModelUsage(model="model-b", requests=1, unknown=0, usage=Usage(input_tokens=100, output_tokens=1)),
    )
    assert found.total_usage == Usage(input_tokens=117, cached_tokens=4, output_tokens=9, reasoning_tokens=1)
    assert found.usage_unknown == 1
    [listed] = (await storage.list_batches(owner=factories.OWNER, after=None, limit=10)).items
    assert listed.usage == found.usage


async def test_a_batch_of_one_model_names_it(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2, model="model-z")
    assert batch.model == "model-z"
    assert (await storage.get_batch(batch.id, owner=factories.OWNER)).model == "model-z"


async def test_a_refused_complete_adds_nothing(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)
    first, second = await factories.claim(storage, daemon)
    await factories.apply(storage, daemon, _complete(first, Usage(input_tokens=5, output_tokens=5)))
    # The same request completed again (refused: it is final) beside one that applies, in one group.
    report = await storage.apply_writes(
        daemon,
        [_complete(first, Usage(input_tokens=1000, output_tokens=1000)), _complete(second, Usage(input_tokens=1))],
    )
    assert report.applied == frozenset({second.id})
    found = await storage.get_batch(batch.id, owner=factories.OWNER)
    assert found.total_usage == Usage(input_tokens=6, output_tokens=5)
    assert [(model.requests, model.unknown) for model in found.usage] == [(2, 0)]


async def test_a_request_sent_twice_counts_once(storage: base.Storage, clock: clocks.ManualClock) -> None:
    # The first daemon dies with the request in flight; another claims it again and completes it; the dead
    # daemon's late result is refused and adds nothing.
    batch = await factories.create_batch(storage, count=1)
    dead = await factories.register(storage, hostname="host-1")
    [first_claim] = await factories.claim(storage, dead)
    await storage.mark_daemon_dead(dead)
    assert await storage.reclaim_requests(stale_after=SECOND) == 1
    clock.advance(SECOND)
    alive = await factories.register(storage, hostname="host-2")
    [second_claim] = await factories.claim(storage, alive)
    assert second_claim.id == first_claim.id
    await factories.apply(storage, alive, _complete(second_claim, Usage(input_tokens=3, output_tokens=2)))
    late = await storage.apply_writes(dead, [_complete(first_claim, Usage(input_tokens=3, output_tokens=2))])
    assert late.applied == frozenset()
    found = await storage.get_batch(batch.id, owner=factories.OWNER)
    assert found.total_usage == Usage(input_tokens=3, output_tokens=2)
    assert [(model.requests, model.unknown) for model in found.usage] == [(1, 0)]


async def test_a_complete_without_spend_counts_nowhere(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=1)
    daemon = await factories.register(storage)
    [request] = await factories.claim(storage, daemon)
    await factories.apply(storage, daemon, models.Complete(request.id, 200, "{}"))
    found = await storage.get_batch(batch.id, owner=factories.OWNER)
    assert found.counts.completed == 1
    assert found.usage == ()


async def test_usage_is_summed_in_the_tick_that_also_claims(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=3)
    daemon = await factories.register(storage)
    [first] = await factories.claim(storage, daemon, count=1)
    report, claimed = await storage.apply_writes_and_claim(
        daemon,
        [_complete(first, Usage(input_tokens=2, output_tokens=1))],
        [models.ModelCapacity(model=factories.MODEL, free=2, limit=None)],
        limit=2,
    )
    assert report.applied == frozenset({first.id}) and len(claimed) == 2
    assert (await storage.get_batch(batch.id, owner=factories.OWNER)).total_usage == Usage(2, 0, 1, 0)
