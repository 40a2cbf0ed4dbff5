"""Request states, the transitions allowed between them, and the OpenAI batch statuses.

```
                      claim (daemon)          mark_processing
   (batch created) --> PENDING -----------> CLAIMED -------------> PROCESSING ----> COMPLETED
                        ^  ^  |               |  |                  |  |  |   complete
                        |  |  |               |  |    release /     |  |  +---------> FAILED
                        |  |  |               |  |    reclaim       |  |      fail     |
                        |  |  |               |  +---------------+  |  |               |
                        |  |  |               |                  |  |  | reschedule    |
                        |  +--+---------------+------------------+--+  | (not_before)  |
                        |     |  release / reclaim (same attempt)      |               |
                        |     |                                        |               |
                        |     +----------------+-----------------------+               |
                        |       cancel         |  cancel / expire                      |
                        |                      v                                       |
                        |                   CANCELED            expire: any non-terminal state
                        |                                        -> FAILED (batch_expired)
                        +---------------------- retry_failed (user) -------------------+
```

Edges, and who takes them:
- `pending -> claimed`: a daemon's claim (fenced: only pending rows, skip-locked).
- `claimed -> processing`: the owning daemon, just before it calls the upstream.
- `processing -> completed | failed`: the owning daemon writes the outcome. Both are final for the daemon:
  a late or duplicate result for a request already completed or failed is refused.
- `processing -> pending`: the owning daemon reschedules a retriable failure (`attempt + 1`, `not_before`).
- `claimed | processing -> pending`: release on graceful stop, or reclaim from a dead daemon (same attempt).
- `pending -> canceled`: cancelling the batch (at once); `claimed | processing -> canceled`: the owning
  daemon aborts its call after it sees the batch is cancelling (or reclaim finds the batch cancelling).
- `pending | claimed | processing -> failed`: the batch expired (`batch_expired`).
- `failed -> pending`: the user retries the failed requests of a batch (`attempt` back to 0).
"""

from __future__ import annotations

from enum import StrEnum

from fusillade import errors


class RequestState(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def is_in_flight(self) -> bool:
        return self in IN_FLIGHT_STATES


TERMINAL_STATES = frozenset({RequestState.COMPLETED, RequestState.FAILED, RequestState.CANCELED})
IN_FLIGHT_STATES = frozenset({RequestState.CLAIMED, RequestState.PROCESSING})
ACTIVE_STATES = frozenset({RequestState.PENDING, *IN_FLIGHT_STATES})

TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.PENDING: frozenset({RequestState.CLAIMED, RequestState.CANCELED, RequestState.FAILED}),
    RequestState.CLAIMED: frozenset(
        {RequestState.PROCESSING, RequestState.PENDING, RequestState.CANCELED, RequestState.FAILED}
    ),
    RequestState.PROCESSING: frozenset(
        {RequestState.COMPLETED, RequestState.FAILED, RequestState.PENDING, RequestState.CANCELED}
    ),
    RequestState.COMPLETED: frozenset(),
    RequestState.FAILED: frozenset({RequestState.PENDING}),
    RequestState.CANCELED: frozenset(),
}


def can_transition(current: RequestState, target: RequestState) -> bool:
    return target in TRANSITIONS[current]


def ensure_transition(current: RequestState, target: RequestState) -> None:
    """Raise `StateConflict` unless `current -> target` is an edge of the diagram above."""
    if not can_transition(current, target):
        raise errors.StateConflict(f"A request cannot go from {current} to {target}.", current_state=str(current))


class BatchStatus(StrEnum):
    """The OpenAI batch status set, as sent on the wire."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}


class FilePurpose(StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"
    BATCH_ERROR = "batch_error"


class DaemonStatus(StrEnum):
    RUNNING = "running"
    DEAD = "dead"
