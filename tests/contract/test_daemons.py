"""DaemonRegistry: registration, heartbeats, death, and reclaiming the requests of dead daemons."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, lines, models, states
from fusillade.storage import base
from tests.support import factories

SECOND = timedelta(seconds=1)
STALE = timedelta(seconds=30)
State = states.RequestState


async def test_register_daemon(storage: base.Storage, clock: clocks.ManualClock) -> None:
    daemon = await storage.register_daemon(
        models.DaemonInfo(hostname="worker-7", pid=4242, version="1.2.3", config={"models": ["a"], "limit": 3})
    )
    assert daemon.hostname == "worker-7"
    assert daemon.pid == 4242
    assert daemon.version == "1.2.3"
    assert daemon.status is states.DaemonStatus.RUNNING
    assert daemon.started_at == daemon.last_heartbeat == clock.now()
    assert daemon.stopped_at is None
    assert daemon.in_flight == 0
    another = await factories.register(storage, "worker-8")
    assert another != daemon.id


async def test_heartbeat_records_time_and_in_flight(storage: base.Storage, clock: clocks.ManualClock) -> None:
    daemon_id = await factories.register(storage)
    started = clock.now()
    clock.advance(5 * SECOND)
    daemon = await storage.heartbeat(daemon_id, in_flight=17)
    assert daemon.id == daemon_id
    assert daemon.last_heartbeat == clock.now()
    assert daemon.started_at == started
    assert daemon.in_flight == 17
    assert daemon.status is states.DaemonStatus.RUNNING
    [listed] = await storage.list_daemons()
    assert listed == daemon


async def test_a_heartbeat_records_the_limits_and_keeps_the_last_when_given_none(storage: base.Storage) -> None:
    daemon_id = await factories.register(storage)
    assert (await storage.heartbeat(daemon_id)).limits == {}
    daemon = await storage.heartbeat(daemon_id, in_flight=3, limits={"gpt-4o": 12, "llama": 3})
    assert daemon.limits == {"gpt-4o": 12, "llama": 3}
    assert (await storage.heartbeat(daemon_id, in_flight=1)).limits == {"gpt-4o": 12, "llama": 3}
    await storage.heartbeat(daemon_id, limits={"gpt-4o": 9})
    [listed] = await storage.list_daemons()
    assert listed.limits == {"gpt-4o": 9}


async def test_list_daemons_newest_first(storage: base.Storage, clock: clocks.ManualClock) -> None:
    made = []
    for index in range(3):
        made.append(await factories.register(storage, f"host-{index}"))
        clock.advance(SECOND)
    assert [daemon.id for daemon in await storage.list_daemons()] == made[::-1]


async def test_mark_dead_is_idempotent_and_stops_heartbeats(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    daemon_id = await factories.register(storage)
    clock.advance(SECOND)
    await storage.mark_daemon_dead(daemon_id)
    died = clock.now()
    clock.advance(SECOND)
    await storage.mark_daemon_dead(daemon_id)
    [daemon] = await storage.list_daemons()
    assert daemon.status is states.DaemonStatus.DEAD
    assert daemon.stopped_at == died
    with pytest.raises(errors.StateConflict):
        await storage.heartbeat(daemon_id)


async def test_unknown_daemon_is_not_found(storage: base.Storage) -> None:
    with pytest.raises(errors.NotFound):
        await storage.heartbeat(ids.new_daemon_id())
    with pytest.raises(errors.NotFound):
        await storage.mark_daemon_dead(ids.new_daemon_id())
    assert await storage.list_daemons() == []


async def test_reclaim_after_a_stale_heartbeat_is_bounded(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    batch = await factories.create_batch(storage, count=5)
    stale = await factories.register(storage, "stale")
    assert len(await factories.claim(storage, stale)) == 5
    by_line = [request.id for request in await factories.all_requests(storage, batch.id)]
    await factories.start(storage, stale, by_line[:2])
    await factories.apply(storage, stale, models.Fail(request_id=by_line[4], code="timeout"))
    clock.advance(STALE / 2)
    alive = await factories.register(storage, "alive")
    assert await storage.reclaim_requests(stale_after=STALE) == 0
    clock.advance(STALE / 2 + SECOND)
    await storage.heartbeat(alive)
    assert await storage.reclaim_requests(stale_after=STALE, limit=3) == 3
    assert await storage.reclaim_requests(stale_after=STALE, limit=3) == 1
    assert await storage.reclaim_requests(stale_after=STALE, limit=3) == 0
    daemons = {daemon.id: daemon for daemon in await storage.list_daemons()}
    assert daemons[stale].status is states.DaemonStatus.DEAD
    assert daemons[stale].stopped_at is not None
    assert daemons[alive].status is states.DaemonStatus.RUNNING
    requests = await factories.all_requests(storage, batch.id)
    assert [request.state for request in requests] == [State.PENDING] * 4 + [State.FAILED]
    for request in requests[:4]:
        assert request.attempt == 0
        assert request.daemon_id is None and request.claimed_at is None and request.started_at is None
    assert requests[4].daemon_id == stale
    assert len(await factories.claim(storage, alive)) == 4


async def test_reclaim_keeps_attempt_and_not_before(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=1)
    daemon = await factories.register(storage)
    [item] = await factories.claim(storage, daemon)
    await factories.start(storage, daemon, [item.id])
    await factories.apply(storage, daemon, models.Reschedule(request_id=item.id, not_before=clock.now()))
    await factories.claim(storage, daemon)
    await storage.mark_daemon_dead(daemon)
    assert await storage.reclaim_requests(stale_after=timedelta(hours=1)) == 1
    [request] = await factories.all_requests(storage, batch.id)
    assert (request.state, request.attempt) == (State.PENDING, 1)


async def test_requests_of_a_daemon_marked_dead_are_reclaimable_at_once(storage: base.Storage) -> None:
    await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)
    await factories.claim(storage, daemon)
    assert await storage.reclaim_requests(stale_after=timedelta(hours=1)) == 0
    await storage.mark_daemon_dead(daemon)
    assert await storage.reclaim_requests(stale_after=timedelta(hours=1)) == 2


async def test_reclaim_of_a_cancelling_batch_cancels(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=3)
    daemon = await factories.register(storage)
    claimed = [item.id for item in await factories.claim(storage, daemon, 2)]
    await factories.start(storage, daemon, claimed[:1])
    await storage.cancel_batch(batch.id, owner="alice")
    clock.advance(STALE + SECOND)
    assert await storage.reclaim_requests(stale_after=STALE) == 2
    requests = await factories.all_requests(storage, batch.id)
    assert [request.state for request in requests] == [State.CANCELED] * 3
    for request in requests[:2]:
        assert request.error_code == lines.BATCH_CANCELLED
        assert request.finished_at == clock.now()
    assert await storage.finalize_batches() == [batch.id]
    done = await storage.get_batch(batch.id, owner="alice")
    assert done.status is states.BatchStatus.CANCELLED
    assert done.counts == models.RequestCounts(total=3, canceled=3)
    error_file = await storage.get_file(batch.error_file_id, owner="alice")
    assert error_file.request_count == 3
    assert error_file.bytes == len(await factories.read_content(storage, batch.error_file_id))


async def test_reclaim_of_a_deleted_batch_cancels(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=2)
    daemon = await factories.register(storage)
    await factories.claim(storage, daemon)
    await storage.delete_batch(batch.id, owner="alice")
    await storage.mark_daemon_dead(daemon)
    assert await storage.reclaim_requests(stale_after=STALE) == 2
    assert await factories.claim(storage, await factories.register(storage, "next")) == []
    assert await storage.cancelling_requests(daemon) == []


async def test_reclaim_of_requests_whose_daemon_has_no_record(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    ghost = ids.new_daemon_id()
    assert len(await factories.claim(storage, ghost)) == 2
    assert await storage.reclaim_requests(stale_after=STALE) == 2
    assert {request.state for request in await factories.all_requests(storage, batch.id)} == {State.PENDING}


async def test_held_requests_are_the_daemons_claimed_and_processing_ones(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=6)
    mine, other = await factories.register(storage, "mine"), await factories.register(storage, "other")
    claimed = await factories.claim(storage, mine, 4)
    await factories.claim(storage, other, 1)
    await factories.start(storage, mine, [claimed[0].id])
    await factories.complete(storage, mine, [claimed[1].id])

    held = await storage.held_requests(mine)

    assert sorted(held) == sorted(request.id for request in (claimed[0], claimed[2], claimed[3]))
    assert await storage.held_requests(ids.new_daemon_id()) == []
    assert len(await factories.all_requests(storage, batch.id)) == 6


async def test_a_daemon_marked_dead_cannot_claim(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    zombie = await factories.register(storage, "zombie")
    await storage.mark_daemon_dead(zombie)

    with pytest.raises(errors.StateConflict):
        await factories.claim(storage, zombie)

    assert {request.state for request in await factories.all_requests(storage, batch.id)} == {State.PENDING}
