"""An owner's usage report (`UsageStore.usage_report`): the usage sums of completed requests by owner and model,
and by day or batch; only the caller's owner unless it is the admin scope; only the days from `since` on; kept
after the batch is deleted and purged."""

from __future__ import annotations

from datetime import date, timedelta

from fusillade import clock as clocks
from fusillade.domain import ids, models
from fusillade.domain.usage import Usage
from fusillade.domain.usage_report import UsageGrouping, UsageRow
from fusillade.storage import base
from tests.support import factories

DAY = timedelta(days=1)
FIRST_DAY = date(2026, 1, 1)
"""The day the contract suite's `ManualClock` starts on."""


def row(
    model: str,
    requests: int,
    unknown: int,
    usage: Usage,
    *,
    owner: str = factories.OWNER,
    day: date | None = None,
    batch_id: ids.BatchId | None = None,
) -> UsageRow:
    return UsageRow(
        owner=owner, model=model, day=day, batch_id=batch_id, requests=requests, unknown=unknown, usage=usage
    )


async def test_an_owner_without_usage_gets_no_row(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=2)  # nothing completed yet
    for by in UsageGrouping:
        assert await storage.usage_report(owner=factories.OWNER, since=None, by=by) == []
        assert await storage.usage_report(owner=models.ALL_OWNERS, since=None, by=by) == []


async def test_by_model_sums_every_batch_of_the_owner_and_no_other_owner(storage: base.Storage) -> None:
    await factories.completed_with_usage(storage, [Usage(10, 4, 3, 1), Usage(7, 0, 5, 0), None])
    await factories.completed_with_usage(storage, [Usage(100, 0, 1, 0)])
    await factories.completed_with_usage(storage, [Usage(1, 0, 1, 0)], model="model-b")
    await factories.completed_with_usage(storage, [Usage(1000, 0, 1000, 0), None], owner="bob")

    alice = await storage.usage_report(owner="alice", since=None, by=UsageGrouping.MODEL)
    assert alice == [
        row("model-a", 3, 1, Usage(117, 4, 9, 1)),
        row("model-b", 1, 0, Usage(1, 0, 1, 0)),
    ]
    assert await storage.usage_report(owner="bob", since=None, by=UsageGrouping.MODEL) == [
        row("model-a", 1, 1, Usage(1000, 0, 1000, 0), owner="bob")
    ]
    assert await storage.usage_report(owner="carol", since=None, by=UsageGrouping.MODEL) == []
    # The admin scope: every owner's rows, by owner then model.
    everyone = await storage.usage_report(owner=models.ALL_OWNERS, since=None, by=UsageGrouping.MODEL)
    assert everyone == [*alice, row("model-a", 1, 1, Usage(1000, 0, 1000, 0), owner="bob")]


async def test_by_day_splits_at_utc_midnight_and_since_keeps_the_later_days(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    clock.advance(DAY - timedelta(seconds=1))  # 23:59:59 on the first day
    await factories.completed_with_usage(storage, [Usage(10, 0, 1, 0)])
    await factories.completed_with_usage(storage, [Usage(1, 0, 1, 0)], model="model-b")
    clock.advance(timedelta(seconds=1))  # midnight: the second day
    await factories.completed_with_usage(storage, [Usage(20, 0, 2, 0), None])
    await factories.completed_with_usage(storage, [Usage(5, 0, 5, 0)], owner="bob")
    clock.advance(2 * DAY)  # the fourth day
    await factories.completed_with_usage(storage, [Usage(30, 0, 3, 0)])
    second, fourth = FIRST_DAY + DAY, FIRST_DAY + 3 * DAY

    assert await storage.usage_report(owner="alice", since=None, by=UsageGrouping.DAY) == [
        row("model-a", 1, 0, Usage(10, 0, 1, 0), day=FIRST_DAY),
        row("model-b", 1, 0, Usage(1, 0, 1, 0), day=FIRST_DAY),
        row("model-a", 1, 1, Usage(20, 0, 2, 0), day=second),
        row("model-a", 1, 0, Usage(30, 0, 3, 0), day=fourth),
    ]
    assert await storage.usage_report(owner="alice", since=second, by=UsageGrouping.DAY) == [
        row("model-a", 1, 1, Usage(20, 0, 2, 0), day=second),
        row("model-a", 1, 0, Usage(30, 0, 3, 0), day=fourth),
    ]
    # `since` applies to every grouping: by model, the days from the second on.
    assert await storage.usage_report(owner="alice", since=second, by=UsageGrouping.MODEL) == [
        row("model-a", 2, 1, Usage(50, 0, 5, 0))
    ]
    assert await storage.usage_report(owner="alice", since=fourth + DAY, by=UsageGrouping.DAY) == []
    assert await storage.usage_report(owner=models.ALL_OWNERS, since=second, by=UsageGrouping.DAY) == [
        row("model-a", 1, 1, Usage(20, 0, 2, 0), day=second),
        row("model-a", 1, 0, Usage(30, 0, 3, 0), day=fourth),
        row("model-a", 1, 0, Usage(5, 0, 5, 0), day=second, owner="bob"),
    ]


async def test_by_batch_gives_each_batch_and_model_in_the_order_of_their_first_day(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    # A batch of two models, whose model-b requests complete a day after its model-a ones.
    mixed = await factories.create_batch(storage, models_by_line=["model-a", "model-b", "model-a"])
    daemon = await factories.register(storage)
    for model, usage in (("model-a", Usage(3, 1, 2, 0)), ("model-b", Usage(4, 0, 4, 4))):
        await factories.apply(
            storage,
            daemon,
            *(
                factories.complete_spending(request, usage)
                for request in await factories.claim(storage, daemon, model=model)
            ),
        )
        clock.advance(DAY)
    later = await factories.completed_with_usage(storage, [Usage(1, 0, 1, 0), Usage(2, 0, 2, 0)])
    await factories.completed_with_usage(storage, [Usage(9, 0, 9, 0)], owner="bob")

    assert await storage.usage_report(owner="alice", since=None, by=UsageGrouping.BATCH) == [
        row("model-a", 2, 0, Usage(6, 2, 4, 0), batch_id=mixed.id),
        row("model-b", 1, 0, Usage(4, 0, 4, 4), batch_id=mixed.id),
        row("model-a", 2, 0, Usage(3, 0, 3, 0), batch_id=later),
    ]
    # From the second day on: the mixed batch's model-b requests, and the later batch.
    assert await storage.usage_report(owner="alice", since=FIRST_DAY + DAY, by=UsageGrouping.BATCH) == [
        row("model-b", 1, 0, Usage(4, 0, 4, 4), batch_id=mixed.id),
        row("model-a", 2, 0, Usage(3, 0, 3, 0), batch_id=later),
    ]
    everyone = await storage.usage_report(owner=models.ALL_OWNERS, since=None, by=UsageGrouping.BATCH)
    assert [(found.owner, found.model) for found in everyone] == [
        ("alice", "model-a"),
        ("alice", "model-b"),
        ("alice", "model-a"),
        ("bob", "model-a"),
    ]


async def test_usage_outlives_the_deletion_and_purge_of_its_batch(storage: base.Storage) -> None:
    batch_id = await factories.completed_with_usage(storage, [Usage(8, 0, 2, 0)])
    await storage.delete_batch(batch_id, owner=factories.OWNER)
    while await storage.purge_deleted():
        pass
    assert await storage.usage_report(owner=factories.OWNER, since=None, by=UsageGrouping.BATCH) == [
        row("model-a", 1, 0, Usage(8, 0, 2, 0), batch_id=batch_id)
    ]
