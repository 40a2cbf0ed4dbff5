"""Request states and their transitions, batch statuses (`domain.states`)."""

from __future__ import annotations

import itertools

import pytest

from fusillade import errors
from fusillade.domain import states

S = states.RequestState

# The edges of the diagram in the states.py docstring, written out independently.
EDGES = {
    (S.PENDING, S.CLAIMED),
    (S.CLAIMED, S.PROCESSING),
    (S.PROCESSING, S.COMPLETED),
    (S.PROCESSING, S.FAILED),
    (S.PROCESSING, S.PENDING),
    (S.CLAIMED, S.PENDING),
    (S.PENDING, S.CANCELED),
    (S.CLAIMED, S.CANCELED),
    (S.PROCESSING, S.CANCELED),
    (S.PENDING, S.FAILED),
    (S.CLAIMED, S.FAILED),
    (S.FAILED, S.PENDING),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(S, S)))
def test_transitions_are_exactly_the_documented_edges(current: S, target: S) -> None:
    assert states.can_transition(current, target) == ((current, target) in EDGES)


@pytest.mark.parametrize(("current", "target"), sorted(EDGES))
def test_ensure_transition_accepts_every_edge(current: S, target: S) -> None:
    states.ensure_transition(current, target)


def test_ensure_transition_refuses_with_the_current_state() -> None:
    with pytest.raises(errors.StateConflict, match="cannot go from completed to pending") as caught:
        states.ensure_transition(S.COMPLETED, S.PENDING)
    assert caught.value.current_state == "completed"


def test_no_state_moves_to_itself() -> None:
    assert not any(states.can_transition(state, state) for state in S)


def test_every_state_has_a_transition_entry() -> None:
    assert set(states.TRANSITIONS) == set(S)


def test_completed_and_canceled_are_final_and_failed_only_goes_back_to_pending() -> None:
    assert states.TRANSITIONS[S.COMPLETED] == frozenset()
    assert states.TRANSITIONS[S.CANCELED] == frozenset()
    assert states.TRANSITIONS[S.FAILED] == frozenset({S.PENDING})


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
