"""Budgets: the writes whose usage reaches a batch's budget stop it in their own transaction (its pending requests
end failed with `budget_exceeded`); calls in flight finish and count; a request handed back to the queue after that
fails too (`transitions.BUDGET_STOP`, `transitions.FAIL_ON_RETURN`); a retry is refused; `max_cost` needs the
pricing of every model of the batch."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import lines, models, states
from fusillade.domain.prices import Prices
from fusillade.domain.usage import Pricing, Usage
from fusillade.storage import base
from tests.support import factories

State = states.RequestState
PRICES = Prices(routed={factories.MODEL: Pricing.per_million(input=1, output=2), "model-b": None})


async def _budgeted(
    storage: base.Storage, budget: models.Budget, *, count: int = 6, **template_options: object
) -> models.Batch:
    file = await factories.upload(storage, count=count, **template_options)  # type: ignore[arg-type]
    return await storage.create_batch(
        models.BatchSpec(
            owner=factories.OWNER, input_file_id=file.id, endpoint=factories.CHAT, budget=budget, prices=PRICES
        )
    )


def _complete(request: models.ClaimedRequest, usage: Usage) -> models.Complete:
    spend = models.Spend(request.batch_id, request.owner, request.model, usage)
    return models.Complete(request.id, 200, factories.response_body(request.id), spend)


async def _states(storage: base.Storage, batch: models.Batch) -> dict[str, State]:
    return {request.custom_id: request.state for request in await factories.all_requests(storage, batch.id)}


async def test_the_write_that_reaches_the_budget_fails_the_pending_requests(storage: base.Storage) -> None:
    batch = await _budgeted(storage, models.Budget(max_total_tokens=10))
    assert batch.budget is not None and batch.budget.max_total_tokens == 10 and batch.budget_exceeded_at is None
    daemon = await factories.register(storage)
    first, second, third = await factories.claim(storage, daemon, count=3)
    await factories.apply(storage, daemon, _complete(first, Usage(input_tokens=3, output_tokens=1)))
    assert (await storage.get_batch(batch.id, owner=factories.OWNER)).budget_exceeded_at is None
    await factories.apply(storage, daemon, _complete(second, Usage(input_tokens=5, output_tokens=2)))  # 11 >= 10
    stopped = await storage.get_batch(batch.id, owner=factories.OWNER)
    assert stopped.budget_exceeded_at is not None
    assert await _states(storage, batch) == {
        "req-1": State.COMPLETED,
        "req-2": State.COMPLETED,
        "req-3": State.CLAIMED,  # in flight: it finishes and counts
        "req-4": State.FAILED,
        "req-5": State.FAILED,
        "req-6": State.FAILED,
    }
    await factories.apply(storage, daemon, _complete(third, Usage(input_tokens=4, output_tokens=4)))
    finished = await storage.get_batch(batch.id, owner=factories.OWNER)
    assert finished.total_usage.total_tokens == 19  # the overshoot: what was in flight
    assert (finished.counts.completed, finished.counts.failed, finished.counts.active) == (3, 3, 0)
    assert await factories.claim(storage, daemon) == []
    await storage.finalize_batches()
    _, failed = await factories.result_lines(storage, await storage.get_batch(batch.id, owner=factories.OWNER))
    assert sorted(line["custom_id"] for line in failed) == ["req-4", "req-5", "req-6"]
    assert {line["error"]["code"] for line in failed} == {lines.BUDGET_EXCEEDED}
    assert all(line["response"] is None for line in failed)


async def test_a_cost_budget_stops_at_its_price(storage: base.Storage) -> None:
    # input at $1 and output at $2 per million tokens: $0.000010 is reached by 4 in + 3 out.
    batch = await _budgeted(storage, models.Budget(max_cost=Decimal("0.00001")), count=3)
    assert batch.budget is not None and batch.budget.prices == {factories.MODEL: PRICES.of(factories.MODEL)}
    daemon = await factories.register(storage)
    first, second = await factories.claim(storage, daemon, count=2)
    await factories.apply(storage, daemon, _complete(first, Usage(input_tokens=2, output_tokens=1)))  # $0.000004
    assert (await storage.get_batch(batch.id, owner=factories.OWNER)).budget_exceeded_at is None
    await factories.apply(storage, daemon, _complete(second, Usage(input_tokens=2, output_tokens=2)))  # $0.000010
    assert (await storage.get_batch(batch.id, owner=factories.OWNER)).budget_exceeded_at is not None
    assert (await _states(storage, batch))["req-3"] is State.FAILED


async def test_a_request_handed_back_after_the_stop_fails(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await _budgeted(storage, models.Budget(max_total_tokens=1), count=4)
    daemon = await factories.register(storage)
    spender, rescheduled, released, orphan = await factories.claim(storage, daemon, count=4)
    await factories.start(storage, daemon, [rescheduled.id])
    await factories.apply(storage, daemon, _complete(spender, Usage(input_tokens=1)))
    await factories.apply(
        storage,
        daemon,
        models.Reschedule(request_id=rescheduled.id, not_before=clock.now()),
        models.Release(released.id),
    )
    await storage.mark_daemon_dead(daemon)
    assert await storage.reclaim_requests(stale_after=timedelta(seconds=1)) == 1
    assert await _states(storage, batch) == {
        "req-1": State.COMPLETED,
        "req-2": State.FAILED,
        "req-3": State.FAILED,
        "req-4": State.FAILED,
    }
    assert orphan.custom_id == "req-4"
    requests = {request.custom_id: request for request in await factories.all_requests(storage, batch.id)}
    assert {requests[name].error_code for name in ("req-2", "req-3", "req-4")} == {lines.BUDGET_EXCEEDED}


async def test_a_batch_that_spent_its_budget_cannot_be_retried(storage: base.Storage) -> None:
    batch = await _budgeted(storage, models.Budget(max_total_tokens=1), count=2)
    daemon = await factories.register(storage)
    [first] = await factories.claim(storage, daemon, count=1)
    await factories.apply(storage, daemon, _complete(first, Usage(input_tokens=5)))
    with pytest.raises(errors.StateConflict, match="spent its budget"):
        await storage.retry_failed(batch.id, owner=factories.OWNER)


async def test_a_budget_not_reached_lets_the_batch_run(storage: base.Storage) -> None:
    batch = await _budgeted(storage, models.Budget(max_total_tokens=1000), count=2)
    daemon = await factories.register(storage)
    first, second = await factories.claim(storage, daemon)
    await factories.apply(
        storage, daemon, _complete(first, Usage(1, 0, 1, 0)), _complete(second, Usage(1, 0, 1, 0))
    )
    done = await storage.get_batch(batch.id, owner=factories.OWNER)
    assert (done.counts.completed, done.budget_exceeded_at) == (2, None)


async def test_a_cost_budget_needs_the_price_of_every_model(storage: base.Storage) -> None:
    file = await factories.upload(storage, models_by_line=[factories.MODEL, "model-b"])
    spec = models.BatchSpec(
        owner=factories.OWNER,
        input_file_id=file.id,
        endpoint=factories.CHAT,
        budget=models.Budget(max_cost=Decimal(1)),
        prices=PRICES,
    )
    with pytest.raises(errors.ValidationError, match="model 'model-b' of the input file has no pricing"):
        await storage.create_batch(spec)
    assert (await storage.list_batches(owner=factories.OWNER, after=None, limit=10)).items == []
