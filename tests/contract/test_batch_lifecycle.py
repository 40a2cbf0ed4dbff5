"""BatchStore: cancel, retry of failed requests, expiry and finalization."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import lines, models, states
from fusillade.storage import base
from tests.support import factories

SECOND = timedelta(seconds=1)
State = states.RequestState


async def _states(storage: base.Storage, batch: models.Batch) -> list[State]:
    return [request.state for request in await factories.all_requests(storage, batch.id)]


async def test_cancel_ends_pending_at_once_and_waits_for_in_flight(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=5)
    daemon = await factories.register(storage)
    claimed = [item.id for item in await factories.claim(storage, daemon, 2)]
    await factories.start(storage, daemon, claimed[:1])
    clock.advance(SECOND)
    cancelled_at = clock.now()
    cancelling = await storage.cancel_batch(batch.id, owner="alice")
    assert cancelling.status is states.BatchStatus.CANCELLING
    assert cancelling.cancelling_at == cancelled_at
    assert cancelling.cancelled_at is None
    assert cancelling.counts == models.RequestCounts(total=5, in_progress=2, canceled=3)
    requests = await factories.all_requests(storage, batch.id)
    assert [request.state for request in requests] == [State.PROCESSING, State.CLAIMED] + [State.CANCELED] * 3
    for request in requests[2:]:
        assert request.error_code == lines.BATCH_CANCELLED
        assert request.error_message == lines.default_message(lines.BATCH_CANCELLED)
        assert request.finished_at == cancelled_at

    clock.advance(SECOND)
    again = await storage.cancel_batch(batch.id, owner="alice")
    assert again.status is states.BatchStatus.CANCELLING
    assert again.cancelling_at == cancelled_at
    assert await storage.finalize_batches() == []
    assert sorted(await storage.cancelling_requests(daemon)) == sorted(claimed)
    assert await factories.claim(storage, daemon) == []

    # The daemon aborts the claimed one; the processing one finished anyway and its result is kept.
    await factories.apply(storage, daemon, models.Cancel(claimed[1]))
    await factories.apply(storage, daemon, models.Complete(claimed[0], 200, factories.response_body(claimed[0])))
    assert await storage.cancelling_requests(daemon) == []
    still = await storage.get_batch(batch.id, owner="alice")
    assert still.status is states.BatchStatus.CANCELLING
    assert still.counts == models.RequestCounts(total=5, completed=1, canceled=4)

    clock.advance(SECOND)
    assert await storage.finalize_batches() == [batch.id]
    done = await storage.get_batch(batch.id, owner="alice")
    assert done.status is states.BatchStatus.CANCELLED
    assert done.cancelled_at == clock.now()
    assert done.finalizing_at is not None
    assert done.completed_at is None
    assert (await storage.cancel_batch(batch.id, owner="alice")).status is states.BatchStatus.CANCELLED
    assert (await storage.get_file(batch.output_file_id, owner="alice")).request_count == 1
    assert (await storage.get_file(batch.error_file_id, owner="alice")).request_count == 4


async def test_a_retry_rescheduled_after_cancel_does_not_keep_the_batch_cancelling(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=3)
    daemon = await factories.register(storage)
    claimed = [item.id for item in await factories.claim(storage, daemon, 2)]
    await factories.start(storage, daemon, claimed)
    await storage.cancel_batch(batch.id, owner="alice")
    # The daemon had already decided to retry one (a 429) and releases the other on shutdown.
    await factories.apply(
        storage,
        daemon,
        models.Reschedule(request_id=claimed[0], not_before=clock.now() + SECOND, code="rate_limited"),
        models.Release(claimed[1]),
    )
    clock.advance(2 * SECOND)
    assert await storage.finalize_batches() == [batch.id]
    assert await factories.claim(storage, daemon) == []
    done = await storage.get_batch(batch.id, owner="alice")
    assert done.status is states.BatchStatus.CANCELLED
    assert done.counts == models.RequestCounts(total=3, canceled=3)
    assert await _states(storage, batch) == [State.CANCELED] * 3


async def test_cancel_with_nothing_in_flight_is_cancelled_at_once(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=3)
    cancelled = await storage.cancel_batch(batch.id, owner="alice")
    assert cancelled.status is states.BatchStatus.CANCELLED
    assert cancelled.cancelled_at == clock.now()
    assert cancelled.counts == models.RequestCounts(total=3, canceled=3)
    assert await storage.finalize_batches() == []
    assert (await storage.get_batch(batch.id, owner="alice")).status is states.BatchStatus.CANCELLED


async def test_cancel_is_scoped_and_refused_for_finished_batches(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    with pytest.raises(errors.NotFound):
        await storage.cancel_batch(batch.id, owner="bob")
    await factories.run_to_completion(storage, batch)
    assert await storage.finalize_batches() == [batch.id]
    with pytest.raises(errors.StateConflict):
        await storage.cancel_batch(batch.id, owner="alice")
    assert (await storage.get_batch(batch.id, owner="alice")).status is states.BatchStatus.COMPLETED


async def test_cancel_of_an_expired_batch_is_refused(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, window="1h")
    clock.advance(timedelta(hours=1))
    assert await storage.expire_batches() == [batch.id]
    with pytest.raises(errors.StateConflict):
        await storage.cancel_batch(batch.id, owner="alice")
    with pytest.raises(errors.StateConflict):
        await storage.retry_failed(batch.id, owner="alice")


async def test_retry_failed_reopens_the_batch(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=4)
    daemon = await factories.register(storage)
    first, second, third, fourth = (request.id for request in await factories.all_requests(storage, batch.id))
    await factories.claim(storage, daemon)
    await factories.start(storage, daemon, [first])
    await factories.apply(
        storage, daemon, models.Reschedule(request_id=first, not_before=clock.now(), code="rate_limited")
    )
    [again] = await factories.claim(storage, daemon)
    assert (again.id, again.attempt) == (first, 1)
    await factories.start(storage, daemon, [first])
    await factories.apply(storage, daemon, models.Fail(request_id=first, status_code=500, body='{"error":"x"}'))
    await factories.fail(storage, daemon, [second])
    await factories.complete(storage, daemon, [third, fourth])
    assert await storage.finalize_batches() == [batch.id]
    assert (await storage.get_file(batch.error_file_id, owner="alice")).request_count == 2

    clock.advance(SECOND)
    with pytest.raises(errors.NotFound):
        await storage.retry_failed(batch.id, owner="bob")
    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 2
    reopened = await storage.get_batch(batch.id, owner="alice")
    assert reopened.status is states.BatchStatus.IN_PROGRESS
    assert reopened.completed_at is None and reopened.finalizing_at is None
    assert reopened.counts == models.RequestCounts(total=4, pending=2, completed=2)
    for request in (await factories.all_requests(storage, batch.id))[:2]:
        assert request.state is State.PENDING
        assert request.attempt == 0
        assert request.not_before is None and request.daemon_id is None
        assert request.finished_at is None and request.claimed_at is None and request.started_at is None
        assert request.response_status is None and request.response_body is None
        assert request.error_code is None and request.error_message is None
    with pytest.raises(errors.NotFound):  # emptied by the retry: gone until a request fails again
        await storage.get_file(batch.error_file_id, owner="alice")
    assert (await storage.get_file(batch.output_file_id, owner="alice")).request_count == 2
    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 0
    assert sorted(item.id for item in await factories.claim(storage, daemon)) == sorted([first, second])


async def test_a_retry_replaces_the_result_files_its_owner_deleted(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=4)
    daemon = await factories.run_to_completion(storage, batch, failing=2)
    assert await storage.finalize_batches() == [batch.id]
    await storage.delete_file(batch.output_file_id, owner="alice")
    await storage.delete_file(batch.error_file_id, owner="alice")

    clock.advance(SECOND)
    done = await storage.retry_failed(batch.id, owner="alice")
    assert done.moved == 2
    retried = await storage.get_batch(batch.id, owner="alice")
    assert done.batch == retried  # the batch as the retry left it, its new files included
    assert (retried.status, retried.counts.pending) == (states.BatchStatus.IN_PROGRESS, 2)
    assert retried.output_file_id != batch.output_file_id and retried.error_file_id != batch.error_file_id
    output = await storage.get_file(retried.output_file_id, owner="alice")
    assert (output.purpose, output.created_at, output.batch_id) == (
        states.FilePurpose.BATCH_OUTPUT,
        clock.now(),
        batch.id,
    )
    assert output.filename == f"batch_{batch.id.hex}_output.jsonl"
    assert output.request_count == 2, "the new output file holds the batch's results, the earlier ones too"
    with pytest.raises(errors.NotFound):  # empty until a request fails again, like any error file
        await storage.get_file(retried.error_file_id, owner="alice")
    for deleted in (batch.output_file_id, batch.error_file_id):
        with pytest.raises(errors.NotFound):
            await storage.get_file(deleted, owner="alice")

    first, second = (item.id for item in await factories.claim(storage, daemon))
    await factories.complete(storage, daemon, [first])
    await factories.fail(storage, daemon, [second])
    assert await storage.finalize_batches() == [batch.id]
    assert len(await factories.read_lines(storage, retried.output_file_id)) == 3
    [error_line] = await factories.read_lines(storage, retried.error_file_id)
    assert error_line["error"]["code"] == "timeout"
    listed = {file.id for file in (await storage.list_files(owner="alice")).items}
    assert {retried.output_file_id, retried.error_file_id} <= listed
    assert not {batch.output_file_id, batch.error_file_id} & listed

    # Only the deleted one is replaced; a retry that moves nothing replaces nothing.
    await storage.delete_file(retried.error_file_id, owner="alice")
    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 1
    again = await storage.get_batch(batch.id, owner="alice")
    assert again.output_file_id == retried.output_file_id
    assert again.error_file_id not in (retried.error_file_id, batch.error_file_id)
    await storage.delete_file(again.output_file_id, owner="alice")
    [last] = await factories.claim(storage, daemon)
    await factories.complete(storage, daemon, [last.id])
    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 0
    assert (await storage.get_batch(batch.id, owner="alice")).output_file_id == again.output_file_id


async def test_retry_failed_without_failures_changes_nothing(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    await factories.run_to_completion(storage, batch)
    assert await storage.finalize_batches() == [batch.id]
    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 0
    assert (await storage.get_batch(batch.id, owner="alice")).status is states.BatchStatus.COMPLETED


async def test_retry_failed_is_refused_while_cancelling_or_cancelled(storage: base.Storage) -> None:
    running = await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)
    claimed = await factories.claim(storage, daemon, 1)
    await factories.fail(storage, daemon, [claimed[0].id])
    cancelling = await storage.cancel_batch(running.id, owner="alice")
    assert cancelling.status is states.BatchStatus.CANCELLED  # nothing in flight
    with pytest.raises(errors.StateConflict):
        await storage.retry_failed(running.id, owner="alice")

    other = await factories.create_batch(storage, count=2)
    [item] = await factories.claim(storage, daemon, 1)
    assert item.batch_id == other.id
    assert (await storage.cancel_batch(other.id, owner="alice")).status is states.BatchStatus.CANCELLING
    with pytest.raises(errors.StateConflict):
        await storage.retry_failed(other.id, owner="alice")


async def test_expire_fails_unfinished_requests_and_keeps_results(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=6, window="1h")
    daemon = await factories.register(storage)
    done, processing, claimed, *_ = (request.id for request in await factories.all_requests(storage, batch.id))
    assert {item.id for item in await factories.claim(storage, daemon, 3)} == {done, processing, claimed}
    await factories.complete(storage, daemon, [done])
    await factories.start(storage, daemon, [processing])
    later = await factories.create_batch(storage, count=1, window="2h")

    clock.advance(timedelta(minutes=59))
    assert await storage.expire_batches() == []
    clock.advance(timedelta(minutes=1))
    assert await storage.expire_batches() == [batch.id]
    expired = await storage.get_batch(batch.id, owner="alice")
    assert expired.status is states.BatchStatus.EXPIRED
    assert expired.expired_at == clock.now()
    assert expired.counts == models.RequestCounts(total=6, completed=1, failed=5)
    requests = await factories.all_requests(storage, batch.id)
    assert requests[0].state is State.COMPLETED and requests[0].response_status == 200
    for request in requests[1:]:
        assert request.state is State.FAILED
        assert request.error_code == lines.BATCH_EXPIRED
        assert request.error_message == lines.default_message(lines.BATCH_EXPIRED)
        assert request.finished_at == clock.now()

    # The daemon's late writes are refused.
    report = await storage.apply_writes(
        daemon, [models.Complete(processing, 200, "{}"), models.Fail(request_id=claimed, code="timeout")]
    )
    assert report.applied == frozenset()
    assert dict(report.conflicts) == {processing: State.FAILED, claimed: State.FAILED}
    assert await storage.cancelling_requests(daemon) == []
    assert await storage.expire_batches() == []
    assert await storage.finalize_batches() == []
    assert (await storage.get_batch(later.id, owner="alice")).status is states.BatchStatus.IN_PROGRESS
    assert [item.batch_id for item in await factories.claim(storage, daemon)] == [later.id]


async def test_expire_waits_for_the_grace(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=1, window="1h")
    clock.advance(timedelta(hours=1))
    assert await storage.expire_batches(grace=timedelta(minutes=10)) == []
    clock.advance(timedelta(minutes=9))
    assert await storage.expire_batches(grace=timedelta(minutes=10)) == []
    clock.advance(timedelta(minutes=1))
    assert await storage.expire_batches(grace=timedelta(minutes=10)) == [batch.id]


async def test_expire_is_bounded_and_oldest_first(storage: base.Storage, clock: clocks.ManualClock) -> None:
    third = await factories.create_batch(storage, count=1, window="3h")
    first = await factories.create_batch(storage, count=1, window="1h")
    second = await factories.create_batch(storage, count=1, window="2h")
    clock.advance(timedelta(hours=3))
    assert await storage.expire_batches(limit=2) == [first.id, second.id]
    assert await storage.expire_batches(limit=2) == [third.id]
    assert await storage.expire_batches(limit=2) == []


async def test_finalize_completes_a_batch_whose_requests_are_terminal(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=3)
    running = await factories.create_batch(storage, count=1, model="other-model")
    await factories.run_to_completion(storage, batch)
    finishing = await storage.get_batch(batch.id, owner="alice")
    assert finishing.status is states.BatchStatus.FINALIZING
    assert finishing.completed_at is None
    clock.advance(SECOND)
    assert await storage.finalize_batches() == [batch.id]
    done = await storage.get_batch(batch.id, owner="alice")
    assert done.status is states.BatchStatus.COMPLETED
    assert done.completed_at == clock.now()
    assert done.finalizing_at is not None and done.finalizing_at <= clock.now()
    assert done.counts == models.RequestCounts(total=3, completed=3)
    assert await storage.finalize_batches() == []
    assert (await storage.get_batch(running.id, owner="alice")).status is states.BatchStatus.IN_PROGRESS


async def test_a_batch_whose_requests_all_failed_is_completed(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=3)
    await factories.run_to_completion(storage, batch, failing=3)
    assert await storage.finalize_batches() == [batch.id]
    done = await storage.get_batch(batch.id, owner="alice")
    assert done.status is states.BatchStatus.COMPLETED
    assert done.failed_at is None
    assert done.counts == models.RequestCounts(total=3, failed=3)


async def test_finalize_is_bounded(storage: base.Storage) -> None:
    made = []
    for index in range(3):
        batch = await factories.create_batch(storage, count=1, model=f"m{index}")
        await factories.run_to_completion(storage, batch, model=f"m{index}")
        made.append(batch.id)
    first = await storage.finalize_batches(limit=2)
    second = await storage.finalize_batches(limit=2)
    assert len(first) == 2 and len(second) == 1
    assert sorted(first + second) == sorted(made)
    assert await storage.finalize_batches(limit=2) == []
