"""Frozen records of the domain: files, request templates, batches, requests, daemons, and the commands a
daemon sends to the request queue. Datetimes are always timezone-aware UTC."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Final, Generic, TypeVar

from fusillade import errors
from fusillade.domain import counts as batch_counts
from fusillade.domain import ids, states
from fusillade.domain.prices import NO_PRICES, Prices
from fusillade.domain.usage import NO_COST, Pricing, Usage, cost

T = TypeVar("T")


def _check_aware(*moments: datetime | None) -> None:
    for moment in moments:
        if moment is not None and moment.tzinfo is None:
            raise ValueError("fusillade datetimes must be timezone-aware (UTC).")


class AllOwners(Enum):
    """The scope of an admin: every owner's objects. Passed explicitly, so a missing owner is never 'all'."""

    ALL = "all"


ALL_OWNERS: Final = AllOwners.ALL
OwnerScope = str | AllOwners
"""Whose objects an operation may see: one owner's name, or `ALL_OWNERS` for an admin."""


# ---------------------------------------------------------------------------------------------- files


@dataclass(frozen=True, slots=True, kw_only=True)
class File:
    """An uploaded input file, or a batch's output or error file (which grows as the batch's requests end)."""

    id: ids.FileId
    owner: str
    filename: str
    purpose: states.FilePurpose
    bytes: int
    """Input files: the uploaded size. Output and error files: the size of the content rendered so far."""
    created_at: datetime
    expires_at: datetime | None = None
    request_count: int = 0
    """Input files: number of request lines. Output and error files: number of lines so far."""
    batch_id: ids.BatchId | None = None
    """Output and error files: the batch whose results they hold."""

    def __post_init__(self) -> None:
        _check_aware(self.created_at, self.expires_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class TemplateInput:
    """One validated input line, ready to be stored (see `domain.jsonl`)."""

    line_number: int
    """1-based line number in the uploaded file."""
    custom_id: str
    method: str
    url: str
    """Path of the upstream endpoint, e.g. `/v1/chat/completions`; never a host."""
    model: str
    body: str
    """The line's `body` object as the user wrote it (its exact text in the line: numbers, escapes and key order
    unchanged)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestTemplate:
    id: ids.TemplateId
    file_id: ids.FileId
    line_number: int
    custom_id: str
    method: str
    url: str
    model: str
    body: str


# -------------------------------------------------------------------------------------------- batches


_WINDOW = re.compile(r"([0-9]{1,9})(s|m|h|d)")
MAX_COMPLETION_WINDOW: Final = timedelta(days=365)
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_completion_window(text: str) -> timedelta:
    """`"24h"` -> 24 hours. Accepts `<n>s`, `<n>m`, `<n>h`, `<n>d` (ASCII digits), from 1 s to 365 days."""
    match = _WINDOW.fullmatch(text)
    if match is None or int(match.group(1)) <= 0:
        raise errors.ValidationError(
            f"completion_window {text!r} is not a duration such as '24h' (use a positive number "
            "followed by s, m, h or d)."
        )
    window = timedelta(seconds=int(match.group(1)) * _WINDOW_UNITS[match.group(2)])
    if window > MAX_COMPLETION_WINDOW:
        raise errors.ValidationError(f"completion_window {text!r} is longer than the maximum of 365 days.")
    return window


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestCounts:
    total: int = 0
    pending: int = 0
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    canceled: int = 0

    @property
    def terminal(self) -> int:
        return self.completed + self.failed + self.canceled

    @property
    def active(self) -> int:
        return self.pending + self.in_progress


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSpec:
    """What a caller asks for when creating a batch."""

    owner: str
    input_file_id: ids.FileId
    endpoint: str
    completion_window: str = "24h"
    metadata: Mapping[str, str] | None = None
    idempotency_key: str | None = None
    """A retried create with the same owner and key returns the first batch instead of a new one."""
    budget: Budget | None = None
    """Its `prices` are empty: storage fixes them from `prices` for the models of the input file."""
    prices: Prices = field(default_factory=lambda: NO_PRICES)
    """The pricing in force, for a budget's `max_cost`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """What a batch may spend. Once its completed requests reach either limit (at least as many tokens, or at
    least that cost), its pending requests end failed with `budget_exceeded`, in the transaction that recorded the
    usage that reached it; calls in flight finish and count (the overshoot is at most what was in flight)."""

    max_total_tokens: int | None = None
    """Input plus output tokens of the completed requests."""
    max_cost: Decimal | None = None
    """USD, at `prices`."""
    prices: Mapping[str, Pricing] = field(default_factory=dict)
    """The pricing of each model of the batch, fixed at its creation (so a later change of the configuration does
    not move a running batch's limit); required for every model when `max_cost` is set."""

    def __post_init__(self) -> None:
        if self.max_total_tokens is None and self.max_cost is None:
            raise ValueError("A budget sets max_total_tokens, max_cost or both.")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError("max_total_tokens must be 1 or more.")
        if self.max_cost is not None and not (self.max_cost.is_finite() and self.max_cost > 0):
            raise ValueError("max_cost must be a positive number of USD.")

    def reached(self, spent: Sequence[ModelUsage]) -> bool:
        """Whether `spent` (a batch's usage by model) reaches either limit."""
        tokens = sum(model.usage.total_tokens for model in spent)
        if self.max_total_tokens is not None and tokens >= self.max_total_tokens:
            return True
        if self.max_cost is not None:
            priced = (cost(model.usage, self.prices[model.model]) for model in spent if model.model in self.prices)
            return sum(priced, NO_COST).total >= self.max_cost
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """A run of an input file: its status (derived from its timestamps and counts), its request counts, and
    the ids of its output and error files."""

    id: ids.BatchId
    owner: str
    input_file_id: ids.FileId
    output_file_id: ids.FileId
    error_file_id: ids.FileId
    endpoint: str
    completion_window: str
    metadata: Mapping[str, str] | None
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    errors: Sequence[BatchError] = ()
    counts: RequestCounts = field(default_factory=RequestCounts)
    model: str | None = None
    """The model every request of the batch names; None when its input file mixes models."""
    usage: Sequence[ModelUsage] = ()
    """The token usage of its completed requests, by model (models without a completed request are left out)."""
    budget: Budget | None = None
    budget_exceeded_at: datetime | None = None
    """When its completed requests reached the budget (its pending requests then ended `budget_exceeded`)."""

    def __post_init__(self) -> None:
        _check_aware(
            self.created_at,
            self.expires_at,
            self.in_progress_at,
            self.finalizing_at,
            self.completed_at,
            self.failed_at,
            self.expired_at,
            self.cancelling_at,
            self.cancelled_at,
        )

    @property
    def status(self) -> states.BatchStatus:
        return batch_counts.batch_status(self)

    @property
    def total_usage(self) -> Usage:
        """The usage of every completed request whose response reported it."""
        return sum((model.usage for model in self.usage), Usage())

    @property
    def usage_unknown(self) -> int:
        """Completed requests whose response carried no usage (counted, never guessed)."""
        return sum(model.unknown for model in self.usage)


@dataclass(frozen=True, slots=True)
class Retried:
    """What a retry of a batch's failed requests did: how many went back to pending, and the batch as the retry
    left it (read in its transaction: a daemon may finish the retried requests right after)."""

    moved: int
    batch: Batch


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """The token usage of one model's completed requests (in a batch, or an owner's usage report)."""

    model: str
    requests: int
    """Completed requests whose response reported usage (summed in `usage`)."""
    unknown: int
    """Completed requests whose response carried no usage."""
    usage: Usage


# ------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    id: ids.RequestId
    batch_id: ids.BatchId
    template_id: ids.TemplateId
    owner: str
    custom_id: str
    model: str
    line_number: int
    state: states.RequestState
    attempt: int = 0
    """Number of earlier attempts that ended in a retriable failure (0 for the first attempt)."""
    not_before: datetime | None = None
    daemon_id: ids.DaemonId | None = None
    claimed_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    response_status: int | None = None
    response_body: str | None = None
    """The upstream's body as JSON text (a JSON string when the upstream did not send JSON)."""
    error_code: str | None = None
    error_message: str | None = None

    def __post_init__(self) -> None:
        _check_aware(self.not_before, self.claimed_at, self.started_at, self.finished_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedRequest:
    """A request handed to a daemon by a claim: everything needed to call the upstream."""

    id: ids.RequestId
    batch_id: ids.BatchId
    owner: str
    custom_id: str
    model: str
    method: str
    url: str
    body: str
    attempt: int
    deadline: datetime
    """The batch's `expires_at`: no retry may start after it."""
    daemon_id: ids.DaemonId
    claimed_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCapacity:
    """How many requests of one model a daemon may start now."""

    model: str
    free: int
    """Slots free in this daemon."""
    limit: int | None = None
    """The model's limit across every daemon sharing the database (None: no shared limit). The claim counts
    requests in flight for the model and never lets the total exceed this."""
    requests_per_minute: int | None = None
    """The model's rate limit (None: none): a token bucket per model shared by every claimer of the database
    (`domain.rate_limit`); the claim takes at most its whole tokens and spends one per request claimed."""
    tokens_per_minute: int | None = None
    """The model's token limit (None: none): a bucket counted in tokens (`domain.rate_limit`); the claim takes
    requests in order while it holds their estimate (`estimate_tokens`), and their real usage corrects it."""


class Claimed(list[ClaimedRequest]):
    """The requests a claim took (a list), and `buckets`: for each model asked for with a rate limit, the level
    of its bucket just after the claim (tokens, fractional), at the claim's time. Empty without rate limits."""

    buckets: Mapping[str, float] = {}  # never changed: a claim with rates sets its own
    token_waits: Mapping[str, float] = {}  # the same
    """For each model whose token bucket stopped the claim before its next request: seconds from the claim
    until the bucket holds that request's estimate (the lane pauses until then)."""


# ------------------------------------------------------------------------------ request queue commands


@dataclass(frozen=True, slots=True)
class MarkProcessing:
    """claimed -> processing, just before the upstream call."""

    request_id: ids.RequestId


@dataclass(frozen=True, slots=True)
class Complete:
    """claimed | processing -> completed with the upstream's response. From claimed, the `MarkProcessing` of a
    fast call that had not been written yet is folded into this write (group commit)."""

    request_id: ids.RequestId
    status_code: int
    body: str
    spend: Spend | None = None
    """Where the response's token usage counts; None counts it nowhere (a write made outside a daemon's call)."""


@dataclass(frozen=True, slots=True)
class Spend:
    """What a completed request spent and where it counts: its batch, owner and model. `usage` is None when the
    response carried none: the request is counted as usage unknown, never guessed. Storage adds it to the batch's
    sums in the transaction of the `Complete`, only when that write applies (so a request sent twice counts once:
    the result kept)."""

    batch_id: ids.BatchId
    owner: str
    model: str
    usage: Usage | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Fail:
    """claimed | processing -> failed, final. Either an upstream HTTP error (`status_code` and `body`), or
    a failure without a response (`code` and `message`, e.g. `timeout`)."""

    request_id: ids.RequestId
    code: str | None = None
    message: str | None = None
    status_code: int | None = None
    body: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reschedule:
    """processing -> pending for another attempt, not before `not_before` (`attempt + 1`)."""

    request_id: ids.RequestId
    not_before: datetime
    code: str | None = None
    """Why the attempt failed (kept on the row for inspection)."""
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """claimed | processing -> pending without counting an attempt (graceful stop)."""

    request_id: ids.RequestId


@dataclass(frozen=True, slots=True)
class Cancel:
    """claimed | processing -> canceled, after the daemon aborted the call of a cancelled batch."""

    request_id: ids.RequestId


RequestWrite = MarkProcessing | Complete | Fail | Reschedule | Release | Cancel


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteReport:
    """What a batch of fenced writes did: each request id lands in exactly one of the three sets."""

    applied: frozenset[ids.RequestId] = frozenset()
    conflicts: Mapping[ids.RequestId, states.RequestState] = field(default_factory=dict)
    """The request exists but was not in the expected state or is owned by another daemon; its state."""
    missing: frozenset[ids.RequestId] = frozenset()

    def check(self, request_id: ids.RequestId) -> None:
        """Raise `NotFound` or `StateConflict` unless the write of `request_id` was applied."""
        if request_id in self.applied:
            return
        if request_id in self.conflicts:
            state = self.conflicts[request_id]
            raise errors.StateConflict(
                f"Request {ids.request_wire(request_id)} is {state} or owned by another daemon; "
                "the write was refused.",
                current_state=str(state),
            )
        raise errors.NotFound(f"Request {ids.request_wire(request_id)} does not exist.")


# -------------------------------------------------------------------------------------------- daemons


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonInfo:
    hostname: str
    pid: int
    version: str
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonRecord:
    """A daemon as the registry keeps it (`DaemonRegistry`): who it is, whether it runs, its last heartbeat. The
    running daemon itself is `fusillade.daemon.Daemon`."""

    id: ids.DaemonId
    hostname: str
    pid: int
    version: str
    status: states.DaemonStatus
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None = None
    in_flight: int = 0
    """Requests in flight at the last heartbeat, as the daemon reported them."""
    limits: Mapping[str, int] = field(default_factory=dict)
    """The concurrency limit of each model's lane at the last heartbeat (an adaptive limit moves)."""


# ------------------------------------------------------------------------------------------- api keys


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    """A bearer key of the HTTP API. Only the SHA-256 of the key is stored; the key itself is shown once, when
    it is created."""

    id: ids.ApiKeyId
    owner: str
    """Every object created with this key belongs to this owner; the key sees only this owner's objects."""
    name: str
    """A label for people (e.g. "ci" or "alice laptop")."""
    prefix: str
    """The first characters of the key, to recognise it in listings (e.g. `fus_3kX9`)."""
    admin: bool
    """An admin key sees and acts on every owner's objects."""
    created_at: datetime
    revoked_at: datetime | None = None

    def __post_init__(self) -> None:
        _check_aware(self.created_at, self.revoked_at)


# ------------------------------------------------------------------------------------------- listings


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    has_more: bool
