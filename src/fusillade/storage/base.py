"""The storage contract: role protocols that every backend (SQLite, PostgreSQL) implements in full.

The daemon, the service layer and the API depend on these protocols only; the concrete backends are wired in
by the composition root. One behavioural test suite (`tests/contract/`) runs against every backend.

Rules that hold for every method:
- Times come from the store's `WallClock` (one reading per transaction), never from the database server, so
  both backends behave alike and tests can move time by hand.
- Owner scoping: every read and write of files and batches takes an `OwnerScope`. An object of another owner
  is reported exactly like a missing one (`NotFound`), so ids cannot be probed. `ALL_OWNERS` is the admin view.
- Soft-deleted objects are invisible (`NotFound`, absent from listings) until `purge_deleted` removes them.
- Driver exceptions never escape: they become `StorageError` (or `StorageUnavailable` when the database could
  not be reached or a call timed out), with the driver's exception as `__cause__`.
- Request writes from daemons are fenced on the expected state and the owning daemon. `completed` and
  `failed` are final for daemons: a late or duplicate write is refused and reported, never applied.
- Every change of a request's state, by any method here, is a transition of the table in `domain.transitions`
  (`tests/contract/test_transitions.py` checks each method against it).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Literal, Protocol

from fusillade.domain import ids, models, served, states, usage_report

SortOrder = Literal["asc", "desc"]


class WritePriority(enum.Enum):
    """How one process's writes take turns with other processes' on a shared SQLite file (PostgreSQL, whose
    writers do not wait for each other, ignores it). SQLite lets one writer in at a time and lets waiting
    writers poll, so a process that writes back to back (an API storing uploads) would starve one that needs
    short, frequent turns (a daemon committing results)."""

    NORMAL = "normal"
    """Takes its turn as SQLite gives it (a one-shot command, `fusillade run`, tests)."""
    HIGH = "high"
    """Announces each write; LOW writers wait until it is done (the daemon)."""
    LOW = "low"
    """Before each write, waits for the HIGH writes announced (the API)."""


TEMPLATE_CHUNK_BYTES = 4 * 1024 * 1024
"""Bodies stored per step of an upload at most (with a count per backend): long lines do not make long steps."""
DEFAULT_DATABASE_TIMEOUT = timedelta(seconds=30)
"""Longest wait for a networked database (connecting, a pooled connection, any one statement): the
configuration's `database_timeout`."""


class FileStore(Protocol):
    async def create_file(
        self,
        *,
        owner: str,
        filename: str,
        templates: AsyncIterable[models.TemplateInput] | Iterable[models.TemplateInput],
        size_bytes: int,
        expires_at: datetime | None = None,
        record_model: Callable[[str], bool] | None = None,
    ) -> models.File:
        """Store an input file (purpose `batch`) and its request templates, inserted in chunks inside ONE
        transaction. If iterating `templates` raises (e.g. the validator found bad lines), the transaction
        is rolled back, nothing is stored, and the exception propagates unchanged. An empty iterable is
        rejected with `ValidationError`. Memory stays flat: templates are consumed as a stream.

        `record_model`: the file's distinct models it accepts (those going to the default route) are recorded
        as seen by `owner` in the same transaction, as `served.SeenModels` gathers them (at most
        `served.SEEN_PER_FILE`, none longer than `served.MAX_SEEN_LENGTH`); a model the owner already has keeps
        its first time. See `list_models_seen`."""
        ...

    async def get_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> models.File:
        """Input, output or error file. Output/error files report `bytes` and `request_count` of the
        content rendered so far. `NotFound` if missing, deleted, or another owner's."""
        ...

    async def list_files(
        self,
        *,
        owner: models.OwnerScope,
        purpose: states.FilePurpose | None = None,
        after: ids.FileId | None = None,
        limit: int = 10_000,
        order: SortOrder = "desc",
    ) -> models.Page[models.File]:
        """Files by `created_at` (then id) in `order`, starting after the file `after` (a cursor that is
        unknown, deleted or another owner's gives `NotFound`)."""
        ...

    async def delete_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> None:
        """Soft delete. Batches already created from an input file keep running (their requests were
        copied); the file's rows are purged once no unfinished batch needs them. `NotFound` as in
        `get_file`."""
        ...

    async def open_file_content(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> AsyncIterator[bytes]:
        """Check the file (raising `NotFound` before any byte is produced) and return its content as a
        stream of JSONL chunks, read from the database in pages:
        - input file: one line per template in line order, `{"custom_id","method","url","body"}`;
        - output file: the batch's completed requests, in completion order (`domain.jsonl` line format);
        - error file: the batch's failed and canceled requests, in completion order.
        Output and error files grow while the batch runs; a request appears in exactly one of them, once,
        after it reached a terminal state."""
        ...


class SeenModelStore(Protocol):
    async def list_models_seen(
        self, *, owner: models.OwnerScope, model: str | None = None, limit: int = served.SEEN_LISTED
    ) -> list[served.SeenModel]:
        """The models recorded for `owner` by `create_file(record_model=...)`: the `limit` most recently first
        seen, newest first (then by name). `ALL_OWNERS`: every owner's, each model once with its earliest time.
        `model`: that model alone (an empty list if it was never recorded)."""
        ...


class BatchStore(Protocol):
    async def create_batch(self, spec: models.BatchSpec) -> models.Batch:
        """Create a batch from an input file of the same owner (`NotFound` otherwise), with its output and
        error files and one pending request per template, all in ONE transaction. The batch starts
        `in_progress` (validation happened at upload) and `expires_at = now + completion_window`. If
        `spec.idempotency_key` was already used by this owner, the first batch is returned and nothing is
        created. Bad endpoint/window: `ValidationError`."""
        ...

    async def get_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        """The batch with fresh `counts` (counted from its requests)."""
        ...

    async def list_batches(
        self,
        *,
        owner: models.OwnerScope,
        after: ids.BatchId | None = None,
        limit: int = 20,
    ) -> models.Page[models.Batch]:
        """Newest first (created_at, then id, descending), each with counts."""
        ...

    async def cancel_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        """Set `cancelling_at`; pending requests end `canceled` at once (error code `batch_cancelled`);
        claimed/processing requests are left to their daemon, which sees the batch in
        `cancelling_requests` and aborts them. A batch with nothing in flight is `cancelled` at once.
        Cancelling a cancelling/cancelled batch returns it unchanged; a completed, failed or expired batch
        raises `StateConflict`."""
        ...

    async def retry_failed(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Retried:
        """Put the batch's failed requests back to pending (attempt 0, errors and responses cleared) and
        reopen the batch (`finalizing_at`/`completed_at` cleared). Returns how many, and the batch as read in
        the same transaction. A cancelling,
        cancelled or expired batch raises `StateConflict`. When requests moved, an output or error file of the
        batch that its owner deleted is replaced by a new one (a new id, `created_at` now) holding the batch's
        results of its kind, the earlier ones too: the batch's `output_file_id`/`error_file_id` never point to a
        deleted file after a retry."""
        ...

    async def delete_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> None:
        """Soft delete (an unfinished batch is cancelled first); purged later by `purge_deleted`."""
        ...

    async def list_requests(
        self,
        batch_id: ids.BatchId,
        *,
        owner: models.OwnerScope,
        state: states.RequestState | None = None,
        after: ids.RequestId | None = None,
        limit: int = 100,
    ) -> models.Page[models.Request]:
        """The batch's requests in input line order, optionally of one state, after a cursor."""
        ...

    async def expire_batches(self, *, grace: timedelta = timedelta(0), limit: int = 100) -> list[ids.BatchId]:
        """For up to `limit` unfinished batches whose `expires_at + grace` has passed: every pending,
        claimed or processing request ends `failed` with code `batch_expired` (daemons' later writes to
        them are refused), finished results are kept, and the batch gets `expired_at`. Returns their ids."""
        ...

    async def finalize_batches(self, *, limit: int = 100) -> list[ids.BatchId]:
        """For up to `limit` unfinished batches whose requests are all terminal: set `finalizing_at` and
        `completed_at` (or `cancelled_at` for a cancelling batch). Returns their ids."""
        ...


class RequestQueue(Protocol):
    """The hot path of the daemons."""

    async def claim_requests(
        self,
        daemon_id: ids.DaemonId,
        capacities: Sequence[models.ModelCapacity],
        *,
        limit: int,
        owner_in_flight: Mapping[str, int] | None = None,
    ) -> models.Claimed:
        """Claim at most `limit` pending requests in total and at most `capacity.free` per model (and never
        more than `capacity.limit - in flight` across all daemons), moving them to `claimed` for
        `daemon_id`. Eligible: state pending, `not_before` passed or unset, batch neither cancelling,
        finished nor deleted. Order within a model: earliest batch deadline first, then batch (FIFO within
        a deadline), then input line. With `owner_in_flight` (requests each owner has in flight), owners
        with fewer in flight go first (fairness); the deadline order holds within an owner. Concurrent
        claimers always get disjoint requests; the global per-model limit holds across them. A daemon that was
        marked dead may not claim (`StateConflict`): its requests may already have gone to others.

        Rate limits: a model whose capacity has `requests_per_minute` has one request bucket
        (`domain.rate_limit.TokenBucket`, full at first) shared by every claimer of the database (PostgreSQL: a
        row, under the model's claim lock; SQLite: the store's process, where the daemon claims), refilled to
        the store's time at each claim. The claim takes at most the bucket's whole tokens of that model and
        spends one per request claimed (a request given back unsent later is not refunded: the limit errs on
        the side of sending less), and reports each such model's level after it in `Claimed.buckets`. A capacity
        without a rate costs the claim nothing more."""
        ...

    async def apply_writes(
        self, daemon_id: ids.DaemonId, writes: Sequence[models.RequestWrite]
    ) -> models.WriteReport:
        """Apply many fenced state writes of one daemon in ONE transaction (group commit). Each write
        applies only if the request is owned by `daemon_id` and in a state its command applies from: the
        states and targets are the table `domain.transitions.DAEMON_WRITES`. `Reschedule` counts an attempt
        (`attempt + 1`, `not_before`), `Release` does not; `Cancel` ends the request with `batch_cancelled`.
        A request that a `Reschedule` or `Release` returns to the queue while its batch is being cancelled (or
        was deleted) ends canceled instead (`transitions.CANCEL_ON_RETURN_MARKS`).

        Going back to pending clears the owner; terminal rows keep the daemon that finished them. A
        refused write changes nothing and is reported in `conflicts` (with the request's current state) or
        `missing`; the others still apply. Two writes for one request id in one call raise `ValueError`."""
        ...

    async def apply_writes_and_claim(
        self,
        daemon_id: ids.DaemonId,
        writes: Sequence[models.RequestWrite],
        capacities: Sequence[models.ModelCapacity],
        *,
        limit: int,
        owner_in_flight: Mapping[str, int] | None = None,
    ) -> tuple[models.WriteReport, models.Claimed]:
        """`apply_writes(writes)`, then `claim_requests(capacities, ...)`, in one trip to the database: the
        daemon's tick (it hands in its results and takes new work in one go). The claim comes second, so it
        sees the slots the writes freed under a global limit. Each part behaves as its own operation (either
        may be empty); if the claim is refused (`StateConflict` for a daemon marked dead), the writes stay
        applied and the error is raised."""
        ...

    async def cancelling_requests(self, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
        """Requests this daemon has claimed or is processing whose batch is being cancelled."""
        ...

    async def in_flight_by_model(self) -> dict[str, int]:
        """Requests claimed or processing, per model, across every daemon (models with none are left out); read
        from the in-flight index, whose size is what is in flight, not the queue's."""
        ...

    async def pending_models(self) -> list[str]:
        """The models that have pending requests, sorted (one index probe per model, however many requests):
        a daemon with a default route learns from it which models to claim for."""
        ...

    async def held_requests(self, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
        """Every request this daemon has claimed or is processing. A daemon compares it with the calls it
        runs to find claims whose acknowledgement it never received (the connection broke after the
        commit), and releases those."""
        ...

    async def maintain_queue(self) -> None:
        """Housekeeping that keeps claims fast while requests flow; daemons call it every second or so, and it
        does nothing until enough changed. PostgreSQL: `VACUUM` of the requests table once 5% of it changed
        since its last vacuum, skipped while another vacuum of it runs (any replica may call it). A claim reads
        the head of the index of pending requests, where the entries of the requests claimed since the last
        vacuum stay until a vacuum removes them: without one, every claim walks all of them (claims slow down
        in proportion to the requests claimed since), and autovacuum, when the server has it on, visits a
        table at most once per `autovacuum_naptime` (a minute by default). A vacuum costs about a pass over
        the table's indexes, hence the threshold. SQLite: nothing to do (its indexes drop entries at once)."""
        ...


class DaemonRegistry(Protocol):
    async def register_daemon(self, info: models.DaemonInfo) -> models.DaemonRecord:
        """A new daemon record, `running`, with a first heartbeat now."""
        ...

    async def heartbeat(
        self, daemon_id: ids.DaemonId, *, in_flight: int = 0, limits: Mapping[str, int] | None = None
    ) -> models.DaemonRecord:
        """Record that the daemon is alive, with its calls in flight and its lanes' limits now (None: leave the
        last ones). `StateConflict` if it was marked dead (its requests may have
        been reclaimed: the daemon must stop), `NotFound` if unknown."""
        ...

    async def mark_daemon_dead(self, daemon_id: ids.DaemonId) -> None:
        """Mark the daemon dead (idempotent). Its claimed/processing requests become reclaimable at once."""
        ...

    async def list_daemons(self) -> list[models.DaemonRecord]:
        """All daemons, most recently started first."""
        ...

    async def reclaim_requests(self, *, stale_after: timedelta, limit: int = 1000) -> int:
        """One bounded sweep: running daemons whose last heartbeat is older than `stale_after` are marked
        dead; then up to `limit` claimed/processing requests of dead or unknown daemons go back to pending
        (same attempt; `canceled` instead if their batch is cancelling). Returns how many requests moved."""
        ...


class KeyStore(Protocol):
    async def create_api_key(
        self, *, owner: str, name: str, key_hash: str, prefix: str, admin: bool = False
    ) -> models.ApiKey:
        """Store a new key by its hash (hex SHA-256 of the key). `ValidationError` if the hash exists."""
        ...

    async def find_api_key(self, key_hash: str) -> models.ApiKey | None:
        """The key with this hash if it exists and is not revoked (one indexed lookup: called per request)."""
        ...

    async def list_api_keys(self, *, owner: models.OwnerScope = models.ALL_OWNERS) -> list[models.ApiKey]:
        """Keys, revoked ones included, oldest first."""
        ...

    async def revoke_api_key(self, key_id: ids.ApiKeyId) -> models.ApiKey:
        """Revoke at once (idempotent); `NotFound` if unknown."""
        ...


class UsageStore(Protocol):
    async def usage_report(
        self, *, owner: models.OwnerScope, since: date | None, by: usage_report.UsageGrouping
    ) -> list[usage_report.UsageRow]:
        """The token usage of the completed requests of `owner` (`ALL_OWNERS`: of every owner), summed per owner
        and model, and also per UTC day or per batch as `by` says; only the days from `since` on (None: every
        day). Read from the usage sums alone (never the requests), which outlive their batch's deletion and
        purge. Ordered by owner, then day or batch (a batch by the first day it has usage on, then its id),
        then model. An owner without usage gets an empty list."""
        ...


class RetentionStore(Protocol):
    async def purge_deleted(self, *, limit: int = 1000) -> int:
        """Hard-delete at most `limit` rows belonging to soft-deleted batches and files (requests first,
        then templates, then the batch and file rows once empty). Returns rows deleted; 0 means nothing is
        left to purge. Callers loop with a pause between calls to throttle."""
        ...


class Storage(
    FileStore,
    SeenModelStore,
    BatchStore,
    RequestQueue,
    DaemonRegistry,
    KeyStore,
    UsageStore,
    RetentionStore,
    Protocol,
):
    """Everything a backend provides, plus its lifecycle."""

    async def migrate(self) -> list[str]:
        """Apply the pending schema migrations (idempotent; safe when several processes start at once).
        Returns the names of those applied."""
        ...

    async def ping(self) -> None:
        """Round-trip to the database; `StorageUnavailable` if it does not answer."""
        ...

    async def close(self) -> None: ...
