"""Request states and the moves between them (drawn below), the OpenAI batch statuses, file purposes and daemon
statuses.

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
Not drawn: `Complete` and `Fail` apply from claimed as well (a call that ended before it was marked processing),
and a request that goes back to pending while its batch is being cancelled ends canceled instead.

Who takes each edge, through which operation, and from which states exactly: the table in `domain.transitions`,
the one source of these rules (this drawing shows them; the fences of both backends and the daemon's writer are
built from the table).

The values are the strings stored and sent on the wire, and stay as they are: a request ends `canceled` (one l,
the spelling of Anthropic's Message Batches results and counts, and of the Rust original), a batch is `cancelling`
then `cancelled` (two, OpenAI's batch statuses).
"""

from __future__ import annotations

from enum import StrEnum


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
