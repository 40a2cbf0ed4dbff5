"""The request queue on SQLite, the daemons' hot path: claims, and the requests a daemon must abort because
their batch is being cancelled (its fenced state writes: `fenced_writes`).

A claim and a group of writes are each one `BEGIN IMMEDIATE` transaction, so they are serialised against every
other writer of the file (this process or another): claimers get disjoint rows and the per-model limit holds.
"""

from __future__ import annotations

import heapq
import random
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import NamedTuple, TypeAlias

from fusillade import errors
from fusillade.domain import ids, models, states
from fusillade.domain.rate_limit import TokenBucket
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite.token_limits import Admission, TokenLimits

# In flight <=> claimed_at set and finished_at not set (the invariant behind the in-flight indexes).
COUNT_IN_FLIGHT = (
    "SELECT COUNT(*) FROM requests WHERE model = ? AND claimed_at IS NOT NULL AND finished_at IS NULL"
)


class ClaimableRow(NamedTuple):
    """A row of `SELECT_CLAIMABLE`, or of `SELECT_OWNER_RUN` after its line number."""

    rowid: int
    id: bytes
    batch_id: bytes
    owner: str
    custom_id: str
    attempt: int
    deadline: int
    method: str
    url: str
    body: str


# The claim (`transitions.CLAIM`, pending -> claimed) keeps its states written out: `state = 'pending'` must read
# as the partial claim indexes' own condition for SQLite to use them. tests/contract/test_transitions.py checks it.
# No join with batches: a batch that is cancelled, expired, finished or deleted has no pending requests (those
# operations end them), so the claim is one scan of the claim index. The only exception is a request that a
# daemon rescheduled while its batch was being cancelled; finalize_batches cancels such leftovers.
SELECT_CLAIMABLE = """
SELECT r.rowid, r.id, r.batch_id, r.owner, r.custom_id, r.attempt, r.deadline, t.method, t.url, t.body
FROM requests AS r
JOIN request_templates AS t ON t.id = r.template_id
WHERE r.model = ? AND r.state = 'pending' AND (r.not_before IS NULL OR r.not_before <= ?)
ORDER BY r.deadline, r.batch_id, r.line_number LIMIT ?
"""

# The fair claim (owners with fewer requests in flight first) reads per owner, in PostgreSQL's order: (owner's
# requests in flight, deadline, batch, line). Leaving busy owners out of the `requests_claim` walk instead would
# read every pending row of the model when a busy owner holds them all (one tenant, one big batch).
# The owners with pending requests of the model (a loose index scan, one probe per owner), each with the claim
# order key of its first claimable row:
SELECT_OWNER_HEADS = """
WITH RECURSIVE found(owner) AS (
    SELECT (SELECT owner FROM requests INDEXED BY requests_claim_by_owner
            WHERE model = ?1 AND state = 'pending' ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT r.owner FROM requests AS r INDEXED BY requests_claim_by_owner
            WHERE r.model = ?1 AND r.state = 'pending' AND r.owner > found.owner ORDER BY r.owner LIMIT 1)
    FROM found WHERE found.owner IS NOT NULL
)
SELECT found.owner, h.deadline, h.batch_id, h.line_number
FROM found JOIN requests AS h ON h.rowid = (
    SELECT r.rowid FROM requests AS r INDEXED BY requests_claim_by_owner
    WHERE r.model = ?1 AND r.owner = found.owner AND r.state = 'pending'
        AND (r.not_before IS NULL OR r.not_before <= ?2)
    ORDER BY r.deadline, r.batch_id, r.line_number LIMIT 1
)
"""
# One owner's claimable rows from a claim order key on: the rows this claim already took are still pending until
# it marks them. `line_number` (for the order key), then the columns of `ClaimableRow`.
SELECT_OWNER_RUN = """
SELECT r.line_number, r.rowid, r.id, r.batch_id, r.owner, r.custom_id, r.attempt, r.deadline, t.method, t.url,
    t.body
FROM requests AS r INDEXED BY requests_claim_by_owner
JOIN request_templates AS t ON t.id = r.template_id
WHERE r.model = ? AND r.owner = ? AND r.state = 'pending' AND (r.not_before IS NULL OR r.not_before <= ?)
    AND (r.deadline, r.batch_id, r.line_number) >= (?, ?, ?)
ORDER BY r.deadline, r.batch_id, r.line_number LIMIT ?
"""
MARK_CLAIMED = "UPDATE requests SET state = 'claimed', daemon_id = ?, claimed_at = ? WHERE rowid = ?"

# Only a cancelling batch (cancelling_at set, cancelled_at not yet) can have requests in flight: a deleted batch
# was cancelled first or had finished, and a cancelled one has none left.
# A loose index scan over the pending index: one probe per distinct model.
SELECT_PENDING_MODELS = """
WITH RECURSIVE found(model) AS (
    SELECT (SELECT model FROM requests INDEXED BY requests_claim WHERE state = 'pending' ORDER BY model LIMIT 1)
    UNION ALL
    SELECT (SELECT r.model FROM requests AS r INDEXED BY requests_claim
            WHERE r.state = 'pending' AND r.model > found.model ORDER BY r.model LIMIT 1)
    FROM found WHERE found.model IS NOT NULL
)
SELECT model FROM found WHERE model IS NOT NULL
"""

# The condition of `requests_in_flight_model` (0001_initial.sql): the index alone answers.
SELECT_IN_FLIGHT_BY_MODEL = """
SELECT model, count(*) FROM requests INDEXED BY requests_in_flight_model
WHERE claimed_at IS NOT NULL AND finished_at IS NULL GROUP BY model
"""

SELECT_DAEMON_STATUS = "SELECT status FROM daemons WHERE id = ?"
DEAD_DAEMON_CLAIM = (
    "Daemon {} was declared dead (its requests may have been reclaimed by others); it may not claim any more."
)

SELECT_HELD = """
SELECT id FROM requests INDEXED BY requests_in_flight_model
WHERE claimed_at IS NOT NULL AND finished_at IS NULL AND daemon_id = ? AND state IN ('claimed', 'processing')
"""

SELECT_CANCELLING = """
SELECT r.id FROM batches AS b CROSS JOIN requests AS r INDEXED BY requests_in_flight_batch ON r.batch_id = b.id
WHERE b.cancelling_at IS NOT NULL AND b.cancelled_at IS NULL
    AND r.claimed_at IS NOT NULL AND r.finished_at IS NULL
    AND r.daemon_id = ? AND r.state IN ('claimed', 'processing')
"""

# ------------------------------------------------------------------------------------------------ claim


def claim_requests(
    connection: sqlite3.Connection,
    now: datetime,
    daemon_id: ids.DaemonId,
    capacities: Sequence[models.ModelCapacity],
    *,
    limit: int,
    owner_in_flight: Mapping[str, int] | None,
    buckets: dict[str, TokenBucket] | None = None,
    tokens: TokenLimits | None = None,
) -> models.Claimed:
    """`buckets`: the request buckets of the models with a rate limit, kept by the store (one process claims on
    SQLite); without them a rate limit is not applied. `tokens`: the same for token limits."""
    status = connection.execute(SELECT_DAEMON_STATUS, (daemon_id.bytes,)).fetchone()
    if status is not None and status[0] == states.DaemonStatus.DEAD.value:
        raise errors.StateConflict(DEAD_DAEMON_CLAIM.format(daemon_id), current_state=status[0])
    wanted = [capacity for capacity in capacities if capacity.free > 0]
    if sum(capacity.free for capacity in wanted) > limit:
        wanted = random.sample(wanted, len(wanted))
    claimed = models.Claimed()
    levels: dict[str, float] | None = None
    for capacity in wanted:
        count = min(capacity.free, limit - len(claimed))
        if capacity.limit is not None:
            in_flight = connection.execute(COUNT_IN_FLIGHT, (capacity.model,)).fetchone()[0]
            count = min(count, capacity.limit - in_flight)
        bucket = None
        if capacity.requests_per_minute is not None and buckets is not None:
            bucket = _bucket(buckets, capacity.model, capacity.requests_per_minute, now)
            count = min(count, bucket.available(now.timestamp()))
        taken = 0
        admit = None
        if capacity.tokens_per_minute is not None and tokens is not None:
            admit = tokens.admission(capacity.model, capacity.tokens_per_minute, now.timestamp(), claimed)
        if count > 0:
            found = _claim_model(connection, now, daemon_id, capacity.model, count, owner_in_flight, admit)
            taken = len(found)
            claimed.extend(found)
        if bucket is not None:
            bucket.spend(taken, now.timestamp())
            levels = levels if levels is not None else {}
            levels[capacity.model] = bucket.level(now.timestamp())
        if len(claimed) >= limit:
            break
    if levels is not None:
        claimed.buckets = levels
    return claimed


def _bucket(buckets: dict[str, TokenBucket], model: str, per_minute: int, now: datetime) -> TokenBucket:
    bucket = buckets.get(model)
    if bucket is None:
        bucket = buckets[model] = TokenBucket.full(per_minute, now.timestamp())
    elif bucket.per_minute != per_minute:
        bucket.change_rate(per_minute, now.timestamp())
    return bucket


def _claim_model(
    connection: sqlite3.Connection,
    now: datetime,
    daemon_id: ids.DaemonId,
    model: str,
    count: int,
    owner_in_flight: Mapping[str, int] | None,
    admit: Admission | None = None,
) -> list[models.ClaimedRequest]:
    moment = connections.to_micros(now)
    busy = {owner: in_flight for owner, in_flight in (owner_in_flight or {}).items() if in_flight > 0}
    rows = _fair_rows(connection, moment, model, count, busy) if busy else None
    if rows is None:
        rows = list(map(ClaimableRow._make, connection.execute(SELECT_CLAIMABLE, (model, moment, count))))
    if admit is not None:
        rows = admit.keep(rows)
    if not rows:
        return []
    daemon_key = daemon_id.bytes
    connection.executemany(MARK_CLAIMED, [(daemon_key, moment, row.rowid) for row in rows])
    to_uuid = connections.to_uuid
    # Rows share a few batches: convert each batch id and deadline once.
    batch_ids = {key: ids.BatchId(to_uuid(key)) for key in {row.batch_id for row in rows}}
    deadlines = {value: connections.from_micros(value) for value in {row.deadline for row in rows}}
    result = [
        models.ClaimedRequest(
            id=ids.RequestId(to_uuid(row.id)),
            batch_id=batch_ids[row.batch_id],
            owner=row.owner,
            custom_id=row.custom_id,
            model=model,
            method=row.method,
            url=row.url,
            body=row.body,
            attempt=row.attempt,
            deadline=deadlines[row.deadline],
            daemon_id=daemon_id,
            claimed_at=now,
        )
        for row in rows
    ]
    if admit is not None:
        admit.claimed(result)
    return result


# A row's place in the fair order: (owner's requests in flight, deadline, batch_id, line_number). Unique: a
# batch has one owner and one line per number.
FairKey: TypeAlias = tuple[int, int, bytes, int]


def _fair_rows(
    connection: sqlite3.Connection, moment: int, model: str, count: int, busy: Mapping[str, int]
) -> list[ClaimableRow] | None:
    """The first `count` claimable rows of `model` in the fair order; None when the owners with claimable rows
    all have as many in flight, as the fair order is then the plain claim order.

    A merge of the owners' runs of rows: a heap of each owner's next row, and from the first owner, the rows that
    come before the next owner's. Each run takes at least one row, so a claim costs one probe per owner and at
    most `count` runs of rows taken (plus one row read per run), however many requests are pending."""
    heads = [
        ((busy.get(owner, 0), deadline, batch_id, line_number), owner)
        for owner, deadline, batch_id, line_number in connection.execute(SELECT_OWNER_HEADS, (model, moment))
    ]
    if len({key[0] for key, _ in heads}) == 1:
        return None
    heapq.heapify(heads)
    rows: list[ClaimableRow] = []
    while heads and len(rows) < count:
        head, owner = heapq.heappop(heads)
        following = heads[0][0] if heads else None
        run, after = _owner_run(connection, moment, model, owner, head, following, count - len(rows))
        rows.extend(run)
        if after is not None:
            heapq.heappush(heads, (after, owner))
    return rows


def _owner_run(
    connection: sqlite3.Connection,
    moment: int,
    model: str,
    owner: str,
    head: FairKey,
    following: FairKey | None,
    count: int,
) -> tuple[list[ClaimableRow], FairKey | None]:
    """`owner`'s claimable rows from `head` on that come before `following` (the next owner's head), at most
    `count`; and the key of the owner's row after them, None if it has no more. Reads one row past the run."""
    load, deadline, batch_id, line_number = head
    parameters = (model, owner, moment, deadline, batch_id, line_number, count + 1)
    run: list[ClaimableRow] = []
    cursor = connection.execute(SELECT_OWNER_RUN, parameters)
    try:
        for line, *columns in cursor:
            row = ClaimableRow._make(columns)
            key = (load, row.deadline, row.batch_id, line)
            if len(run) == count or (following is not None and key > following):
                return run, key
            run.append(row)
        return run, None
    finally:
        cursor.close()


def cancelling_requests(connection: sqlite3.Connection, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
    return [
        ids.RequestId(connections.to_uuid(row[0]))
        for row in connection.execute(SELECT_CANCELLING, (daemon_id.bytes,))
    ]


def held_requests(connection: sqlite3.Connection, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
    return [
        ids.RequestId(connections.to_uuid(row[0])) for row in connection.execute(SELECT_HELD, (daemon_id.bytes,))
    ]


def pending_models(connection: sqlite3.Connection) -> list[str]:
    return [str(row[0]) for row in connection.execute(SELECT_PENDING_MODELS)]


def in_flight_by_model(connection: sqlite3.Connection) -> dict[str, int]:
    return {str(model): int(count) for model, count in connection.execute(SELECT_IN_FLIGHT_BY_MODEL)}
