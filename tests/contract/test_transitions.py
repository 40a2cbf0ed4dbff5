"""Every change of a request's state against the table in `domain.transitions`: each daemon write command tried
from every state, and each other operation run on a batch holding one request in every state. The table says
which requests move and where; anything else must stay as it was.

Each test checks many pairs on one database (a batch per command or operation); a failing pair is named by its
subtest (`state=…, command=…` or `state=…, operation=…`)."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

import asyncpg
import pytest

from fusillade import clock as clocks
from fusillade.domain import ids, models, states, transitions
from fusillade.storage import base
from fusillade.storage.postgres import rows as postgres_rows
from fusillade.storage.sqlite import rows as sqlite_rows
from tests.support import backends, factories

State = states.RequestState
Transition = transitions.Transition
ONE_PER_STATE = tuple(State)


def _after(steps: Sequence[Transition], state: State) -> State:
    """Where the table takes a request in `state` through `steps` (a step it is not in a source of leaves it)."""
    for step in steps:
        if state in step.sources:
            state = step.target
    return state


async def _states(storage: base.Storage, batch: models.Batch) -> dict[ids.RequestId, State]:
    return {request.id: request.state for request in await factories.all_requests(storage, batch.id)}


async def _one_per_state(
    storage: base.Storage, *, model: str = factories.MODEL
) -> tuple[models.Batch, ids.DaemonId, dict[State, ids.RequestId]]:
    """A batch of `model` with one request in each state (in `RequestState` order by line); `daemon` holds the
    claimed and processing ones and finished the terminal ones."""
    batch = await factories.create_batch(storage, count=len(ONE_PER_STATE), model=model)
    daemon = await factories.register(storage)
    await factories.claim(storage, daemon, model=model)
    by_line = [request.id for request in await factories.all_requests(storage, batch.id)]
    placed = dict(zip(ONE_PER_STATE, by_line, strict=True))
    await factories.apply(
        storage,
        daemon,
        models.Release(placed[State.PENDING]),
        models.MarkProcessing(placed[State.PROCESSING]),
        models.MarkProcessing(placed[State.COMPLETED]),
        models.Fail(request_id=placed[State.FAILED], code="timeout"),
        models.Cancel(placed[State.CANCELED]),
    )
    await factories.apply(storage, daemon, models.Complete(placed[State.COMPLETED], 200, "{}"))
    assert await _states(storage, batch) == {request_id: state for state, request_id in placed.items()}
    return batch, daemon, placed


def _write(kind: type[models.RequestWrite], request_id: ids.RequestId, now: datetime) -> models.RequestWrite:
    """A write of command `kind` for the request."""
    if kind is models.MarkProcessing:
        return models.MarkProcessing(request_id)
    if kind is models.Complete:
        return models.Complete(request_id, 200, '{"ok":true}')
    if kind is models.Fail:
        return models.Fail(request_id=request_id, code="timeout")
    if kind is models.Reschedule:
        return models.Reschedule(request_id=request_id, not_before=now)
    if kind is models.Release:
        return models.Release(request_id)
    if kind is models.Cancel:
        return models.Cancel(request_id)
    raise AssertionError(f"No write of {kind.__name__} here: add it.")


# ------------------------------------------------------------------------------------ daemon writes


async def test_every_daemon_write_from_every_state(
    storage: base.Storage, clock: clocks.ManualClock, subtests: pytest.Subtests
) -> None:
    # One batch (of its own model) per command, each with a request in every state.
    placed = {
        kind: await _one_per_state(storage, model=f"model-{kind.__name__}") for kind in transitions.DAEMON_WRITES
    }
    for kind, (batch, daemon, requests) in placed.items():
        transition = transitions.DAEMON_WRITES[kind]
        for state, request_id in requests.items():
            with subtests.test(state=state.value, command=kind.__name__):
                report = await storage.apply_writes(daemon, [_write(kind, request_id, clock.now())])
                if state in transition.sources:
                    assert (report.applied, dict(report.conflicts)) == (frozenset({request_id}), {})
                else:
                    assert (report.applied, dict(report.conflicts)) == (frozenset(), {request_id: state})
                assert report.missing == frozenset()
                expected = _after([transition], state)
                assert (await _states(storage, batch))[request_id] is expected


async def test_a_return_to_the_queue_of_a_cancelling_batch_cancels(
    storage: base.Storage, clock: clocks.ManualClock, subtests: pytest.Subtests
) -> None:
    returns = [
        (kind, state)
        for kind, item in transitions.DAEMON_WRITES.items()
        if item.returns_to_queue
        for state in item.sources
    ]
    batch = await factories.create_batch(storage, count=len(returns))
    daemon = await factories.register(storage)
    await factories.claim(storage, daemon)
    by_line = [request.id for request in await factories.all_requests(storage, batch.id)]
    await factories.start(
        storage,
        daemon,
        [request_id for request_id, (_, state) in zip(by_line, returns, strict=True) if state is State.PROCESSING],
    )
    await storage.cancel_batch(batch.id, owner=factories.OWNER)
    for request_id, (kind, state) in zip(by_line, returns, strict=True):
        with subtests.test(state=state.value, command=kind.__name__):
            assert (await _states(storage, batch))[request_id] is state
            await factories.apply(storage, daemon, _write(kind, request_id, clock.now()))
            expected = _after([transitions.CANCEL_ON_RETURN], state)
            assert (await _states(storage, batch))[request_id] is expected is State.CANCELED


# -------------------------------------------------------------------------------- other operations

Operation = Callable[[base.Storage, clocks.ManualClock, models.Batch, ids.DaemonId], Awaitable[object]]


async def _claim(
    storage: base.Storage, clock: clocks.ManualClock, batch: models.Batch, daemon: ids.DaemonId
) -> object:
    other = await factories.register(storage, "other")
    return {request.id for request in await factories.claim(storage, other)}


async def _cancel(
    storage: base.Storage, clock: clocks.ManualClock, batch: models.Batch, daemon: ids.DaemonId
) -> object:
    await storage.cancel_batch(batch.id, owner=factories.OWNER)
    return None


async def _expire(
    storage: base.Storage, clock: clocks.ManualClock, batch: models.Batch, daemon: ids.DaemonId
) -> object:
    clock.advance(timedelta(hours=24, seconds=1))
    assert await storage.expire_batches() == [batch.id]
    return None


async def _retry(
    storage: base.Storage, clock: clocks.ManualClock, batch: models.Batch, daemon: ids.DaemonId
) -> object:
    return (await storage.retry_failed(batch.id, owner=factories.OWNER)).moved


async def _reclaim(
    storage: base.Storage, clock: clocks.ManualClock, batch: models.Batch, daemon: ids.DaemonId
) -> object:
    await storage.mark_daemon_dead(daemon)
    return await storage.reclaim_requests(stale_after=timedelta(hours=1))


async def _reclaim_cancelling(
    storage: base.Storage, clock: clocks.ManualClock, batch: models.Batch, daemon: ids.DaemonId
) -> object:
    await storage.cancel_batch(batch.id, owner=factories.OWNER)
    await storage.mark_daemon_dead(daemon)
    return await storage.reclaim_requests(stale_after=timedelta(hours=1))


# name -> (the operation, the table's steps it takes: the last is the operation's own, those before it prepare it)
OPERATIONS: dict[str, tuple[Operation, tuple[Transition, ...]]] = {
    "claim": (_claim, (transitions.CLAIM,)),
    "cancel_batch": (_cancel, (transitions.CANCEL_PENDING,)),
    "expire_batches": (_expire, (transitions.EXPIRE,)),
    "retry_failed": (_retry, (transitions.RETRY_FAILED,)),
    "reclaim_requests": (_reclaim, (transitions.RECLAIM,)),
    "reclaim_requests of a cancelling batch": (
        _reclaim_cancelling,
        (transitions.CANCEL_PENDING, transitions.CANCEL_ON_RETURN),
    ),
}


TRIED_ELSEWHERE = {
    # They need a batch with a budget and usage that reaches it: tests/contract/test_budgets.py.
    transitions.BUDGET_STOP,
    transitions.FAIL_ON_RETURN,
}


def test_every_transition_is_tried() -> None:
    tried = {step for _, steps in OPERATIONS.values() for step in steps} | set(transitions.DAEMON_WRITES.values())
    assert tried | TRIED_ELSEWHERE == set(transitions.TABLE)


@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_operation_from_every_state(
    storage: base.Storage, clock: clocks.ManualClock, subtests: pytest.Subtests, name: str
) -> None:
    operation, steps = OPERATIONS[name]
    batch, daemon, placed = await _one_per_state(storage)
    outcome = await operation(storage, clock, batch, daemon)
    now = await _states(storage, batch)
    # The requests the operation itself moved (after the steps that prepare it, if any).
    moved = {
        request_id for state, request_id in placed.items() if _after(steps, state) is not _after(steps[:-1], state)
    }
    for state, request_id in placed.items():
        with subtests.test(state=state.value, operation=name):
            expected = _after(steps, state)
            assert now[request_id] is expected
    # What the operation says it did agrees with the table.
    if isinstance(outcome, set):
        assert outcome == moved
    elif isinstance(outcome, int):
        assert outcome == len(moved)


# ------------------------------------------------------------------ the backends' rendering of states


async def test_state_predicates_select_exactly_their_states(
    backend: backends.Backend, storage: base.Storage
) -> None:
    """The function each backend renders its state conditions with, for every set of states, with and without a
    table alias, on the real table (on PostgreSQL, claimed and processing are one stored state told apart by
    `started_at`)."""
    _, _, placed = await _one_per_state(storage)
    subsets = [
        frozenset(subset) for size in range(len(State) + 1) for subset in itertools.combinations(State, size)
    ]
    if backend.is_postgres:
        connection = await asyncpg.connect(backend.location)
        try:
            for subset in subsets:
                for alias in ("r", ""):
                    table = f"requests {alias}" if alias else "requests"
                    sql = f"SELECT id FROM {table} WHERE {postgres_rows.state_predicate(subset, alias=alias)}"
                    found = {uuid.UUID(int=row[0].int) for row in await connection.fetch(sql)}
                    assert found == {placed[state] for state in subset}, (sorted(subset), alias)
        finally:
            await connection.close()
    else:
        with contextlib.closing(sqlite3.connect(backend.location)) as database:
            for subset in subsets:
                for alias in ("r", ""):
                    table = f"requests AS {alias}" if alias else "requests"
                    sql = f"SELECT id FROM {table} WHERE {sqlite_rows.state_predicate(subset, alias=alias)}"
                    found = {uuid.UUID(bytes=row[0]) for row in database.execute(sql)}
                    assert found == {placed[state] for state in subset}, (sorted(subset), alias)
