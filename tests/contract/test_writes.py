"""RequestQueue.apply_writes: each command's from/to states, fencing on the owning daemon, final states, the
report, and cancelling_requests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, lines, models, states
from fusillade.storage import base
from tests.support import factories

SECOND = timedelta(seconds=1)
State = states.RequestState


async def _claimed(
    storage: base.Storage, count: int = 4
) -> tuple[models.Batch, ids.DaemonId, list[ids.RequestId]]:
    batch = await factories.create_batch(storage, count=count)
    daemon = await factories.register(storage)
    claimed = await factories.claim(storage, daemon)
    by_line = [request.id for request in await factories.all_requests(storage, batch.id)]
    assert {item.id for item in claimed} == set(by_line)
    return batch, daemon, by_line


async def _request(storage: base.Storage, batch: models.Batch, request_id: ids.RequestId) -> models.Request:
    [found] = [request for request in await factories.all_requests(storage, batch.id) if request.id == request_id]
    return found


async def _refused(
    storage: base.Storage, daemon: ids.DaemonId, write: models.RequestWrite, current: State
) -> None:
    report = await storage.apply_writes(daemon, [write])
    assert report.applied == frozenset()
    assert dict(report.conflicts) == {write.request_id: current}
    assert report.missing == frozenset()
    with pytest.raises(errors.StateConflict):
        report.check(write.request_id)


async def test_mark_processing(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch, daemon, (first, *_) = await _claimed(storage)
    clock.advance(SECOND)
    report = await storage.apply_writes(daemon, [models.MarkProcessing(first)])
    assert report.applied == frozenset({first})
    request = await _request(storage, batch, first)
    assert request.state is State.PROCESSING
    assert request.started_at == clock.now()
    assert request.daemon_id == daemon
    await _refused(storage, daemon, models.MarkProcessing(first), State.PROCESSING)


async def test_complete_is_final(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch, daemon, (first, *_) = await _claimed(storage)
    await factories.start(storage, daemon, [first])
    clock.advance(SECOND)
    await factories.apply(storage, daemon, models.Complete(first, 201, '{"v":1}'))
    request = await _request(storage, batch, first)
    assert request.state is State.COMPLETED
    assert (request.response_status, request.response_body) == (201, '{"v":1}')
    assert request.finished_at == clock.now()
    assert request.error_code is None and request.error_message is None
    assert request.daemon_id == daemon
    for late in (
        models.Complete(first, 200, '{"v":2}'),
        models.Fail(request_id=first, code="timeout"),
        models.Release(first),
        models.Cancel(first),
        models.MarkProcessing(first),
        models.Reschedule(request_id=first, not_before=clock.now()),
    ):
        await _refused(storage, daemon, late, State.COMPLETED)
    assert await _request(storage, batch, first) == request


async def test_fail_from_claimed_or_processing_is_final(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch, daemon, (first, second, third, _) = await _claimed(storage)
    await factories.start(storage, daemon, [second])
    clock.advance(SECOND)
    report = await storage.apply_writes(
        daemon,
        [models.Fail(request_id=first, code="invalid_request", message="bad"), models.Fail(request_id=second)],
    )
    assert report.applied == frozenset({first, second})
    failed = await _request(storage, batch, first)
    assert failed.state is State.FAILED
    assert (failed.error_code, failed.error_message) == ("invalid_request", "bad")
    assert failed.finished_at == clock.now()
    assert failed.response_status is None
    for late in (models.Complete(first, 200, "{}"), models.Fail(request_id=first, code="again")):
        await _refused(storage, daemon, late, State.FAILED)
    assert await _request(storage, batch, first) == failed
    await factories.apply(storage, daemon, models.Release(third))
    await _refused(storage, daemon, models.Fail(request_id=third, code="x"), State.PENDING)


async def test_reschedule(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch, daemon, (first, second, *_) = await _claimed(storage)
    not_before = clock.now() + 30 * SECOND
    await _refused(storage, daemon, models.Reschedule(request_id=first, not_before=not_before), State.CLAIMED)
    await factories.start(storage, daemon, [first])
    await factories.apply(
        storage,
        daemon,
        models.Reschedule(
            request_id=first, not_before=not_before, code="rate_limited", message="429 from upstream"
        ),
    )
    request = await _request(storage, batch, first)
    assert request.state is State.PENDING
    assert request.attempt == 1
    assert request.not_before == not_before
    assert request.daemon_id is None and request.claimed_at is None and request.started_at is None
    assert request.finished_at is None
    assert (request.error_code, request.error_message) == ("rate_limited", "429 from upstream")
    await _refused(storage, daemon, models.Reschedule(request_id=first, not_before=not_before), State.PENDING)
    assert (await storage.get_batch(batch.id, owner="alice")).counts.pending == 1
    clock.advance(30 * SECOND)
    [again] = await factories.claim(storage, daemon)
    assert (again.id, again.attempt) == (first, 1)
    await factories.start(storage, daemon, [first])
    await factories.apply(storage, daemon, models.Reschedule(request_id=first, not_before=clock.now()))
    assert (await _request(storage, batch, first)).attempt == 2
    assert (await _request(storage, batch, second)).attempt == 0


async def test_release_keeps_the_attempt(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch, daemon, (first, second, *_) = await _claimed(storage)
    await factories.start(storage, daemon, [second])
    await factories.apply(storage, daemon, models.Release(first), models.Release(second))
    for request_id in (first, second):
        request = await _request(storage, batch, request_id)
        assert request.state is State.PENDING
        assert request.attempt == 0
        assert request.daemon_id is None and request.claimed_at is None and request.started_at is None
    await _refused(storage, daemon, models.Release(first), State.PENDING)
    # After a retry, a release keeps the attempt number of the retry.
    claimed = {item.id: item for item in await factories.claim(storage, daemon)}
    assert set(claimed) == {first, second}
    await factories.start(storage, daemon, [first])
    await factories.apply(storage, daemon, models.Reschedule(request_id=first, not_before=clock.now()))
    [again] = await factories.claim(storage, daemon)
    await factories.apply(storage, daemon, models.Release(again.id))
    assert (await _request(storage, batch, first)).attempt == 1


async def test_cancel_write(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch, daemon, (first, second, third, _) = await _claimed(storage)
    await factories.start(storage, daemon, [second])
    clock.advance(SECOND)
    await factories.apply(storage, daemon, models.Cancel(first), models.Cancel(second))
    for request_id in (first, second):
        request = await _request(storage, batch, request_id)
        assert request.state is State.CANCELED
        assert request.error_code == lines.BATCH_CANCELLED
        assert request.error_message == lines.default_message(lines.BATCH_CANCELLED)
        assert request.finished_at == clock.now()
    await _refused(storage, daemon, models.Cancel(first), State.CANCELED)
    await _refused(storage, daemon, models.Complete(second, 200, "{}"), State.CANCELED)
    await factories.apply(storage, daemon, models.Release(third))
    await _refused(storage, daemon, models.Cancel(third), State.PENDING)


async def test_writes_are_fenced_on_the_owning_daemon(storage: base.Storage) -> None:
    batch, owner_daemon, (first, *_) = await _claimed(storage)
    other = await factories.register(storage, "other")
    await _refused(storage, other, models.MarkProcessing(first), State.CLAIMED)
    await factories.start(storage, owner_daemon, [first])
    for write in (
        models.Complete(first, 200, "{}"),
        models.Fail(request_id=first, code="x"),
        models.Release(first),
        models.Cancel(first),
    ):
        await _refused(storage, other, write, State.PROCESSING)
    request = await _request(storage, batch, first)
    assert (request.state, request.daemon_id) == (State.PROCESSING, owner_daemon)


async def test_report_sorts_each_write_into_one_set(storage: base.Storage) -> None:
    batch, daemon, (first, second, third, fourth) = await _claimed(storage)
    unknown = ids.new_request_id()
    report = await storage.apply_writes(
        daemon,
        [
            models.MarkProcessing(first),
            models.Reschedule(request_id=second, not_before=datetime.now(UTC)),  # still claimed: refused
            models.Complete(unknown, 200, "{}"),
            models.Fail(request_id=third, code="timeout"),
        ],
    )
    assert report.applied == frozenset({first, third})
    assert dict(report.conflicts) == {second: State.CLAIMED}
    assert report.missing == frozenset({unknown})
    report.check(first)
    with pytest.raises(errors.NotFound):
        report.check(unknown)
    with pytest.raises(errors.StateConflict):
        report.check(second)
    states_now = {request.id: request.state for request in await factories.all_requests(storage, batch.id)}
    assert states_now == {
        first: State.PROCESSING,
        second: State.CLAIMED,
        third: State.FAILED,
        fourth: State.CLAIMED,
    }


async def test_complete_from_claimed_folds_in_the_start(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch, daemon, (first, *_) = await _claimed(storage)
    claimed_at = clock.now()
    clock.advance(timedelta(seconds=1))
    await factories.apply(storage, daemon, models.Complete(first, 200, '{"ok":true}'))
    request = await _request(storage, batch, first)
    assert request.state is State.COMPLETED
    # The daemon starts a call as soon as it is claimed, and marks only slow calls processing.
    assert request.started_at == request.claimed_at == claimed_at
    assert request.finished_at == clock.now()
    assert request.response_body == '{"ok":true}'


async def test_duplicate_ids_in_one_call_raise_before_any_change(storage: base.Storage) -> None:
    batch, daemon, (first, second, *_) = await _claimed(storage)
    with pytest.raises(ValueError):
        await storage.apply_writes(
            daemon,
            [models.MarkProcessing(second), models.MarkProcessing(first), models.Complete(first, 200, "{}")],
        )
    assert {request.state for request in await factories.all_requests(storage, batch.id)} == {State.CLAIMED}


async def test_empty_writes_give_an_empty_report(storage: base.Storage) -> None:
    daemon = await factories.register(storage)
    report = await storage.apply_writes(daemon, [])
    assert (report.applied, dict(report.conflicts), report.missing) == (frozenset(), {}, frozenset())


async def test_a_zombie_daemons_late_write_is_refused(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=3)
    zombie = await factories.register(storage, "zombie")
    taken = [item.id for item in await factories.claim(storage, zombie)]
    await factories.start(storage, zombie, taken[:1])
    clock.advance(timedelta(seconds=45))
    heir = await factories.register(storage, "heir")
    assert await storage.reclaim_requests(stale_after=timedelta(seconds=30)) == 3
    reclaimed = [item.id for item in await factories.claim(storage, heir)]
    assert sorted(reclaimed) == sorted(taken)
    report = await storage.apply_writes(
        zombie,
        [models.Complete(taken[0], 200, '{"zombie":true}'), models.MarkProcessing(taken[1])],
    )
    assert report.applied == frozenset()
    assert dict(report.conflicts) == {taken[0]: State.CLAIMED, taken[1]: State.CLAIMED}
    with pytest.raises(errors.StateConflict):
        await storage.heartbeat(zombie)
    await factories.complete(storage, heir, [taken[0]])
    request = await _request(storage, batch, taken[0])
    assert request.state is State.COMPLETED
    assert request.daemon_id == heir
    assert request.response_body == factories.response_body(taken[0])
    assert request.attempt == 0


async def test_cancelling_requests_lists_only_this_daemons_in_flight(storage: base.Storage) -> None:
    doomed = await factories.create_batch(storage, count=6)
    first = await factories.register(storage, "first")
    second = await factories.register(storage, "second")
    mine = [item.id for item in await factories.claim(storage, first, 3)]
    theirs = [item.id for item in await factories.claim(storage, second, 2)]
    await factories.start(storage, first, mine[:1])
    await factories.fail(storage, first, mine[2:])
    kept = await factories.create_batch(storage, count=1, model="other")
    [unrelated] = await factories.claim(storage, first, 1, model="other")
    assert unrelated.batch_id == kept.id
    assert await storage.cancelling_requests(first) == []
    await storage.cancel_batch(doomed.id, owner="alice")
    assert sorted(await storage.cancelling_requests(first)) == sorted(mine[:2])
    assert sorted(await storage.cancelling_requests(second)) == sorted(theirs)
    await factories.apply(storage, first, models.Cancel(mine[0]))
    assert await storage.cancelling_requests(first) == [mine[1]]
    assert await storage.cancelling_requests(ids.new_daemon_id()) == []
