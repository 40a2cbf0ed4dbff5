"""Every change of a request's state, in one table: what makes it, the states it applies from, the state it
leaves, and who takes it. The states themselves and their diagram are in `domain.states`.

This table is the rule; the code that moves requests follows it:
- the state conditions of both backends' statements are rendered from its rows by each backend's
  `rows.state_predicate` (PostgreSQL stores claimed and processing as one state, `in_flight`, told apart by
  `started_at`): the fences of the daemon's writes (`RequestQueue.apply_writes`, `storage/*/fenced_writes.py`,
  and SQLite's `ALLOWED_FROM`), batch cancel, expiry and retry (`storage/*/lifecycle.py`) and reclaim
  (`storage/*/daemons.py`); cancel on return from `CANCEL_ON_RETURN_MARKS`;
- the daemon's group commit (`daemon/pending_writes.py`) takes from it which writes fold into a later one
  (`FOLDS`) and which refused retries count as applied (a write whose final target the request already reached);
- the claim keeps `state = 'pending'` written out, as the claim indexes' own condition
  (`functions/claim_requests.sql` on PostgreSQL, `queue.py` on SQLite): a planner uses a partial index only for
  a query that states it.
`tests/contract/test_transitions.py` runs every operation from every state on both backends and compares the
outcome with this table (`delete_batch` and `finalize_batches` cancel pending requests with the statement of
`cancel_batch`).

A transition applies only when the request is in one of its `sources` (and, for a daemon's write, still owned by
that daemon); otherwise it changes nothing. Each operation has conditions beyond the request's state (a claim
waits for `not_before`, an expiry for the batch's window, ...): those are in the operation's docstring in
`storage/base.py`; this table says which state moves are possible at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fusillade.domain import models
from fusillade.domain.states import RequestState

_PENDING, _CLAIMED, _PROCESSING = RequestState.PENDING, RequestState.CLAIMED, RequestState.PROCESSING
_COMPLETED, _FAILED, _CANCELED = RequestState.COMPLETED, RequestState.FAILED, RequestState.CANCELED

_FENCED_WRITE = ("apply_writes", "apply_writes_and_claim")


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the table."""

    name: str
    sources: frozenset[RequestState]
    """The states it applies from; a request in any other state is left as it is."""
    target: RequestState
    by: str
    """Who takes it, and when."""
    via: tuple[str, ...]
    """The storage operations (`storage.base.Storage` methods) that take it."""
    returns_to_queue: bool = False
    """Hands the request back to the queue: subject to cancel on return (`CANCEL_ON_RETURN_MARKS`)."""


def _transition(
    name: str,
    sources: set[RequestState],
    target: RequestState,
    by: str,
    via: tuple[str, ...],
    *,
    returns_to_queue: bool = False,
) -> Transition:
    return Transition(name, frozenset(sources), target, by, via, returns_to_queue)


# ------------------------------------------------------------------------------------------------ table

CLAIM: Final = _transition(
    "claim", {_PENDING}, _CLAIMED, "a daemon with free slots", ("claim_requests", "apply_writes_and_claim")
)

DAEMON_WRITES: Final[Mapping[type[models.RequestWrite], Transition]] = {
    models.MarkProcessing: _transition(
        "MarkProcessing",
        {_CLAIMED},
        _PROCESSING,
        "the owning daemon, once a call has run for a while (or just before its Reschedule)",
        _FENCED_WRITE,
    ),
    models.Complete: _transition(
        "Complete",
        {_CLAIMED, _PROCESSING},
        _COMPLETED,
        "the owning daemon, with the upstream's answer",
        _FENCED_WRITE,
    ),
    models.Fail: _transition(
        "Fail", {_CLAIMED, _PROCESSING}, _FAILED, "the owning daemon, after a final failure", _FENCED_WRITE
    ),
    models.Reschedule: _transition(
        "Reschedule",
        {_PROCESSING},
        _PENDING,
        "the owning daemon, after a retriable failure (attempt + 1, not before a time)",
        _FENCED_WRITE,
        returns_to_queue=True,
    ),
    models.Release: _transition(
        "Release",
        {_CLAIMED, _PROCESSING},
        _PENDING,
        "the owning daemon, for a call it stops (graceful stop) or gives back unsent (a model no longer routed, a "
        "claim too old to start, a claim whose answer it never received); same attempt",
        _FENCED_WRITE,
        returns_to_queue=True,
    ),
    models.Cancel: _transition(
        "Cancel",
        {_CLAIMED, _PROCESSING},
        _CANCELED,
        "the owning daemon, after it aborted the call of a batch being cancelled",
        _FENCED_WRITE,
    ),
}
"""The daemon's fenced writes, by command: each applies only to a request its daemon owns."""

CANCEL_PENDING: Final = _transition(
    "cancel pending",
    {_PENDING},
    _CANCELED,
    "a user cancelling or deleting the batch (its requests in flight are left to their daemons); the "
    "finalization of a cancelling batch that still has pending requests",
    ("cancel_batch", "delete_batch", "finalize_batches"),
)
EXPIRE: Final = _transition(
    "expire",
    {_PENDING, _CLAIMED, _PROCESSING},
    _FAILED,
    "a daemon's expiry sweep, once the batch's window (and grace) passed: error `batch_expired`",
    ("expire_batches",),
)
RETRY_FAILED: Final = _transition(
    "retry failed",
    {_FAILED},
    _PENDING,
    "a user retrying the failed requests of a batch (attempt 0); refused for a batch that is cancelling, "
    "cancelled, expired or failed",
    ("retry_failed",),
)
RECLAIM: Final = _transition(
    "reclaim",
    {_CLAIMED, _PROCESSING},
    _PENDING,
    "a daemon's reclaim sweep, for the requests of dead daemons (same attempt)",
    ("reclaim_requests",),
    returns_to_queue=True,
)

_RETURNS = [transition for transition in (*DAEMON_WRITES.values(), RECLAIM) if transition.returns_to_queue]
CANCEL_ON_RETURN: Final = _transition(
    "cancel on return",
    {state for transition in _RETURNS for state in transition.sources},
    _CANCELED,
    "the store, in place of a return to the queue (" + ", ".join(item.name for item in _RETURNS) + ") when the "
    "batch is being cancelled or was deleted: see `CANCEL_ON_RETURN_MARKS`",
    (*_FENCED_WRITE, "reclaim_requests"),
)

BUDGET_STOP: Final = _transition(
    "budget stop",
    {_PENDING},
    _FAILED,
    "the store, in the transaction of a daemon's writes whose `Complete`s bring the batch's completed usage to "
    "its budget (`Batch.budget`; it sets `budget_exceeded_at`): error `budget_exceeded`",
    _FENCED_WRITE,
)
FAIL_ON_RETURN: Final = _transition(
    "fail on return",
    {state for transition in _RETURNS for state in transition.sources},
    _FAILED,
    "the store, in place of a return to the queue (" + ", ".join(item.name for item in _RETURNS) + ") when the "
    "batch has spent its budget (`budget_exceeded_at` set): error `budget_exceeded`",
    (*_FENCED_WRITE, "reclaim_requests"),
)

CANCEL_ON_RETURN_MARKS: Final = ("cancelling_at", "deleted_at")
"""The cancel-on-return policy, stated once: a request handed back to the queue (a transition with
`returns_to_queue`) ends `canceled`, not `pending`, when its batch has either of these timestamps set, that is
when the batch is being cancelled (or was: cancelling sets `cancelling_at` for good) or was deleted (an unfinished
batch is cancelled when deleted, so that mark is a safeguard). Claims do not look at batches, so such a request
would otherwise run again; a cancelling batch's own cancel has already ended its pending requests. Both backends
write the condition from these names (the columns of their `batches` tables): the daemon's writes in the store's
write transaction, the reclaim in its sweep."""

TABLE: Final[tuple[Transition, ...]] = (
    CLAIM,
    *DAEMON_WRITES.values(),
    CANCEL_PENDING,
    EXPIRE,
    RETRY_FAILED,
    RECLAIM,
    CANCEL_ON_RETURN,
    BUDGET_STOP,
    FAIL_ON_RETURN,
)


# ---------------------------------------------------------------------------------------------- derived

NEXT_STATES: Final[Mapping[RequestState, frozenset[RequestState]]] = {
    state: frozenset(transition.target for transition in TABLE if state in transition.sources)
    for state in RequestState
}
"""The edges of the diagram in `domain.states`: every state a request can go to from each state."""


def folds_into(earlier: Transition, later: Transition) -> bool:
    """Whether `earlier` then `later`, for one request, may be written as `later` alone (group commit): `later`
    applies from every state `earlier` applies from, and from the state `earlier` leaves, so the request ends in
    `later`'s target either way. A `MarkProcessing` followed by a write that accepts `claimed` folds; a
    `Reschedule` (from processing only) does not."""
    return earlier.sources <= later.sources and earlier.target in later.sources


FOLDS: Final[frozenset[tuple[type[models.RequestWrite], type[models.RequestWrite]]]] = frozenset(
    (earlier, later)
    for (earlier, first), (later, second) in itertools.product(DAEMON_WRITES.items(), repeat=2)
    if folds_into(first, second)
)
"""The (earlier, later) daemon write commands for one request that fold into the later one."""
