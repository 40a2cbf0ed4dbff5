"""The daemon's group commit (`daemon.pending_writes.PendingWrites`): which writes of one request fold into one
group, and which refusals of a retried group count as applied, as the transition table says."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fusillade.daemon import pending_writes
from fusillade.domain import ids, models, states, transitions

State = states.RequestState


def _write(kind: type[models.RequestWrite], request_id: ids.RequestId) -> models.RequestWrite:
    if kind is models.MarkProcessing:
        return models.MarkProcessing(request_id)
    if kind is models.Complete:
        return models.Complete(request_id, 200, "{}")
    if kind is models.Fail:
        return models.Fail(request_id=request_id, code="timeout")
    if kind is models.Reschedule:
        return models.Reschedule(request_id=request_id, not_before=datetime.now(UTC))
    if kind is models.Release:
        return models.Release(request_id)
    if kind is models.Cancel:
        return models.Cancel(request_id)
    raise AssertionError(f"No write of {kind.__name__} here: add it.")


def _pending() -> pending_writes.PendingWrites:
    return pending_writes.PendingWrites(max_size=100, on_arrival=lambda: None)


@pytest.mark.parametrize(
    ("earlier", "later"),
    [(earlier, later) for earlier in transitions.DAEMON_WRITES for later in transitions.DAEMON_WRITES],
    ids=lambda kind: kind.__name__,
)
def test_two_writes_of_one_request_fold_as_the_table_says(
    earlier: type[models.RequestWrite], later: type[models.RequestWrite]
) -> None:
    pending = _pending()
    request_id = ids.new_request_id()
    results: list[tuple[str, pending_writes.WriteResult, models.RequestWrite]] = []
    first, second = _write(earlier, request_id), _write(later, request_id)
    pending.submit(first, lambda result, write: results.append(("earlier", result, write)))
    pending.submit(second, lambda result, write: results.append(("later", result, write)))
    group = pending.take_group()
    if (earlier, later) in transitions.FOLDS:
        assert [type(write) for write in group.writes] == [later]
        assert len(pending) == 0
        assert pending.settle(group, models.WriteReport(applied=frozenset({request_id}))) == 0
        assert [name for name, result, _ in results if result.applied] == ["earlier", "later"]
        assert [write for _, _, write in results] == [second, second]  # each callback is given the write made
    else:
        # The later write waits for the earlier one's answer, in a group of its own.
        assert [type(write) for write in group.writes] == [earlier]
        assert not pending.ready()
        pending.settle(group, models.WriteReport(applied=frozenset({request_id})))
        assert [type(write) for write in pending.take_group().writes] == [later]


@pytest.mark.parametrize("kind", list(transitions.DAEMON_WRITES), ids=lambda kind: kind.__name__)
def test_a_retried_write_refused_in_its_final_target_counts_as_applied(kind: type[models.RequestWrite]) -> None:
    target = transitions.DAEMON_WRITES[kind].target
    request_id = ids.new_request_id()
    results: list[pending_writes.WriteResult] = []
    pending = _pending()
    pending.submit(_write(kind, request_id), lambda result, _: results.append(result))
    pending.put_back(pending.take_group())  # its transaction failed: maybe committed unheard
    group = pending.take_group()
    refused = pending.settle(group, models.WriteReport(conflicts={request_id: target}))
    # Only a final state is proof enough: a request back in pending or processing may be another daemon's.
    assert results == [pending_writes.WriteResult(target.is_terminal, target)]
    assert refused == (0 if target.is_terminal else 1)


def test_a_first_try_refused_in_its_target_is_refused() -> None:
    request_id = ids.new_request_id()
    results: list[pending_writes.WriteResult] = []
    pending = _pending()
    pending.submit(models.Complete(request_id, 200, "{}"), lambda result, _: results.append(result))
    assert pending.settle(pending.take_group(), models.WriteReport(conflicts={request_id: State.COMPLETED})) == 1
    assert results == [pending_writes.WriteResult(False, State.COMPLETED)]
