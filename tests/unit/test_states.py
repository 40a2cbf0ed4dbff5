"""Request states and batch statuses (`domain.states`), and the invariants of the transition table
(`domain.transitions`)."""

from __future__ import annotations

import typing

import pytest

from fusillade.domain import models, states, transitions
from fusillade.storage import base

S = states.RequestState
T = transitions

# The edges of the diagram in the states.py docstring (with the moves it names below it), written out
# independently of the table.
EDGES = {
    (S.PENDING, S.CLAIMED),
    (S.CLAIMED, S.PROCESSING),
    (S.PROCESSING, S.COMPLETED),
    (S.PROCESSING, S.FAILED),
    (S.CLAIMED, S.COMPLETED),
    (S.CLAIMED, S.FAILED),
    (S.PROCESSING, S.PENDING),
    (S.CLAIMED, S.PENDING),
    (S.PENDING, S.CANCELED),
    (S.CLAIMED, S.CANCELED),
    (S.PROCESSING, S.CANCELED),
    (S.PENDING, S.FAILED),
    (S.FAILED, S.PENDING),
}


def test_the_table_draws_the_diagram() -> None:
    assert set(T.NEXT_STATES) == set(S)
    derived = {(current, target) for current, targets in T.NEXT_STATES.items() for target in targets}
    assert derived == EDGES


def test_every_daemon_write_command_has_one_row() -> None:
    assert set(T.DAEMON_WRITES) == set(typing.get_args(models.RequestWrite))
    assert [transition.name for transition in T.DAEMON_WRITES.values()] == [
        kind.__name__ for kind in T.DAEMON_WRITES
    ]
    assert len({transition.name for transition in T.TABLE}) == len(T.TABLE)


def test_terminal_states_have_no_way_out_but_a_retry_of_failed_requests() -> None:
    leaving_terminal = [transition for transition in T.TABLE if transition.sources & states.TERMINAL_STATES]
    assert leaving_terminal == [T.RETRY_FAILED]
    assert T.RETRY_FAILED.sources == {S.FAILED}
    assert T.NEXT_STATES[S.COMPLETED] == frozenset()
    assert T.NEXT_STATES[S.CANCELED] == frozenset()
    assert T.NEXT_STATES[S.FAILED] == {S.PENDING}


def test_every_state_is_reachable_from_pending() -> None:
    reached = {S.PENDING}
    frontier = [S.PENDING]
    while frontier:
        for target in T.NEXT_STATES[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(S)


@pytest.mark.parametrize("transition", T.TABLE, ids=lambda transition: transition.name)
def test_no_transition_leads_back_into_its_own_sources(transition: T.Transition) -> None:
    # Applying a transition twice must be refused the second time (a retried or duplicate write changes nothing).
    assert transition.sources
    assert transition.target not in transition.sources


def test_daemon_writes_apply_only_to_requests_in_flight() -> None:
    # A daemon owns a request only while it is claimed or processing.
    for transition in T.DAEMON_WRITES.values():
        assert transition.sources <= states.IN_FLIGHT_STATES, transition.name
        assert transition.via == ("apply_writes", "apply_writes_and_claim")


def test_returns_to_the_queue_and_their_cancel() -> None:
    returning = {transition.name for transition in T.TABLE if transition.returns_to_queue}
    assert returning == {"Reschedule", "Release", "reclaim"}
    assert all(
        transition.target is S.PENDING and transition.sources <= states.IN_FLIGHT_STATES
        for transition in T.TABLE
        if transition.returns_to_queue
    )
    # The only other way back to pending is a user's retry of failed requests.
    assert [
        transition for transition in T.TABLE if transition.target is S.PENDING and not transition.returns_to_queue
    ] == [T.RETRY_FAILED]
    assert T.CANCEL_ON_RETURN.sources == states.IN_FLIGHT_STATES
    assert T.CANCEL_ON_RETURN.target is S.CANCELED
    assert T.CANCEL_ON_RETURN_MARKS == ("cancelling_at", "deleted_at")


def _after(transition: T.Transition, state: S) -> S:
    return transition.target if state in transition.sources else state


def test_the_fold_rule() -> None:
    folded = {(earlier.__name__, later.__name__) for earlier, later in T.FOLDS}
    assert folded == {
        ("MarkProcessing", "Complete"),
        ("MarkProcessing", "Fail"),
        ("MarkProcessing", "Release"),
        ("MarkProcessing", "Cancel"),
    }
    # A pair folds exactly when the later write applies after the earlier one and, from any state, the later
    # write alone leaves the request where the pair would.
    for earlier, first in T.DAEMON_WRITES.items():
        for later, second in T.DAEMON_WRITES.items():
            same_end = all(_after(second, _after(first, state)) == _after(second, state) for state in S)
            expected = first.target in second.sources and same_end
            assert ((earlier, later) in T.FOLDS) == expected, (earlier.__name__, later.__name__)


def test_transitions_name_operations_of_the_storage_contract() -> None:
    for transition in T.TABLE:
        for operation in transition.via:
            assert callable(getattr(base.Storage, operation, None)), (transition.name, operation)


def test_state_groups_partition_the_states() -> None:
    assert set(S) == states.TERMINAL_STATES | states.ACTIVE_STATES
    assert not states.TERMINAL_STATES & states.ACTIVE_STATES
    assert states.IN_FLIGHT_STATES < states.ACTIVE_STATES
    assert [state for state in S if state.is_terminal] == [S.COMPLETED, S.FAILED, S.CANCELED]
    assert [state for state in S if state.is_in_flight] == [S.CLAIMED, S.PROCESSING]


def test_values_are_the_wire_strings() -> None:
    assert [state.value for state in S] == ["pending", "claimed", "processing", "completed", "failed", "canceled"]
    assert f"{S.CLAIMED}" == "claimed"
    assert [status.value for status in states.BatchStatus] == [
        "validating",
        "in_progress",
        "finalizing",
        "completed",
        "failed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    assert [purpose.value for purpose in states.FilePurpose] == ["batch", "batch_output", "batch_error"]
    assert [status.value for status in states.DaemonStatus] == ["running", "dead"]


def test_terminal_batch_statuses() -> None:
    terminal = {status for status in states.BatchStatus if status.is_terminal}
    assert terminal == {"completed", "failed", "expired", "cancelled"}
