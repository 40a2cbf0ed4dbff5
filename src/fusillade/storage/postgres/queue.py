"""The request queue, the daemons' hot path: claim and cancellation lookups (fenced writes: `fenced_writes`).

Claim: models with a shared limit are serialised by a per-model transaction advisory lock (taken in key order,
so two claimers cannot deadlock), then ONE statement counts what is in flight per model, walks each model's
pending rows in deadline order (`FOR UPDATE SKIP LOCKED`, so concurrent claimers get disjoint rows) and marks
them claimed. Without shared limits the claim is that single statement alone.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from fusillade.domain import ids, models
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

_LOCK_MODELS = "SELECT count(pg_advisory_xact_lock(key)) FROM unnest($1::bigint[]) AS key"

_WANTED = """
wanted AS (
    SELECT w.model, w.position,
           CASE WHEN w.model_limit IS NULL THEN w.free
                ELSE GREATEST(0, LEAST(w.free, w.model_limit - (
                    SELECT count(*) FROM requests f WHERE f.model = w.model AND f.state = 'in_flight'
                )))
           END AS take
    FROM unnest($1::text[], $2::integer[], $3::integer[]) WITH ORDINALITY AS w(model, free, model_limit, position)
)"""
"""How many requests to take per model: the daemon's free slots, capped by the model's shared limit minus what
is in flight across all daemons (counted after the advisory locks, so the count is current)."""

# No join with batches: a batch that is cancelled, expired, finished or deleted has no pending requests (those
# operations end them), so the claim is one scan of the claim index whatever the planner's statistics say. The
# only exception is a request that a daemon rescheduled while its batch was being cancelled; finalize_batches
# cancels such leftovers.
_ELIGIBLE = """
    r.state = 'pending' AND (r.not_before IS NULL OR r.not_before <= $4)
"""

_PICK_BY_DEADLINE = f"""
picked AS (
    SELECT p.ctid
    FROM wanted w
    CROSS JOIN LATERAL (
        SELECT r.ctid
        FROM requests r
        WHERE r.model = w.model AND {_ELIGIBLE}
        ORDER BY r.deadline, r.batch_id, r.line_number
        LIMIT w.take
        FOR UPDATE OF r SKIP LOCKED
    ) p
    LIMIT $5
)"""

# Fair order, (owner's requests in flight, deadline, batch, line), without sorting every pending row: find the
# owners with pending requests of each model (a skip scan of requests_claim_by_owner), lock each owner's first
# `take` eligible rows in deadline order, then keep the first `take` of those per model in the fair order.
# Rows locked but not kept are released at commit; meanwhile other claimers skip them.
_PICK_BY_OWNER_LOAD = f"""
owners AS (
    SELECT w.model, w.take,
           (SELECT min(r.owner) FROM requests r WHERE r.state = 'pending' AND r.model = w.model) AS owner
    FROM wanted w
    WHERE w.take > 0
    UNION ALL
    SELECT o.model, o.take,
           (SELECT min(r.owner) FROM requests r
            WHERE r.state = 'pending' AND r.model = o.model AND r.owner > o.owner)
    FROM owners o
    WHERE o.owner IS NOT NULL
),
candidates AS (
    SELECT o.model, c.ctid, COALESCE(f.in_flight, 0) AS load, c.deadline, c.batch_id, c.line_number
    FROM owners o
    LEFT JOIN unnest($7::text[], $8::integer[]) AS f(owner, in_flight) ON f.owner = o.owner
    CROSS JOIN LATERAL (
        SELECT r.ctid, r.deadline, r.batch_id, r.line_number
        FROM requests r
        WHERE r.model = o.model AND r.owner = o.owner AND {_ELIGIBLE}
        ORDER BY r.deadline, r.batch_id, r.line_number
        LIMIT o.take
        FOR UPDATE OF r SKIP LOCKED
    ) c
    WHERE o.owner IS NOT NULL
),
ranked AS (
    SELECT c.ctid, w.position, w.take,
           row_number() OVER (
               PARTITION BY c.model ORDER BY c.load, c.deadline, c.batch_id, c.line_number
           ) AS rank
    FROM candidates c
    JOIN wanted w ON w.model = c.model
),
picked AS (
    SELECT ctid FROM ranked WHERE rank <= take ORDER BY position, rank LIMIT $5
)"""

_MARK_CLAIMED = """
claimed AS (
    -- By the locked rows' ctids: a TID scan whatever the planner guesses of how many rows were picked.
    UPDATE requests r
    SET state = 'in_flight', daemon_id = $6, claimed_at = $4
    WHERE r.ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING r.id, r.batch_id, r.owner, r.custom_id, r.model, r.template_id, r.attempt, r.deadline
)
-- Columns in the order `rows.claimed_from_rows` unpacks them.
SELECT c.id, c.batch_id, c.owner, c.custom_id, c.model, t.method, t.url, t.body, c.attempt, c.deadline
FROM claimed c
JOIN request_templates t ON t.id = c.template_id
"""

_CLAIM = f"WITH {_WANTED}, {_PICK_BY_DEADLINE}, {_MARK_CLAIMED}"
_CLAIM_BY_OWNER = f"WITH RECURSIVE {_WANTED}, {_PICK_BY_OWNER_LOAD}, {_MARK_CLAIMED}"

_HELD_REQUESTS = """
SELECT id FROM requests WHERE state = 'in_flight' AND daemon_id = $1 ORDER BY id
"""

_CANCELLING_REQUESTS = """
SELECT r.id
FROM requests r
JOIN batches b ON b.id = r.batch_id
WHERE r.daemon_id = $1 AND r.state = 'in_flight'
  AND (b.cancelling_at IS NOT NULL OR b.deleted_at IS NOT NULL)
ORDER BY r.id
"""

_VACUUM = "VACUUM (SKIP_LOCKED) requests"

VACUUM_TIMEOUT_S = 600.0
"""Longest vacuum of the requests table (a pass over a large table's indexes outlasts the statement timeout)."""


def model_lock_key(model: str) -> int:
    """The 64-bit advisory lock key that serialises claims of one model (stable across processes)."""
    digest = hashlib.blake2b(b"fusillade.model:" + model.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class ClaimPlan:
    """What one claim asks of the database, models in the (random) order they are served."""

    models: list[str]
    free: list[int]
    limits: list[int | None]
    lock_keys: list[int]
    """Advisory lock keys of the models with a shared limit, sorted."""
    total: int


def plan_claim(capacities: Sequence[models.ModelCapacity], limit: int) -> ClaimPlan | None:
    """None when nothing can be claimed. A model listed twice keeps its first capacity."""
    chosen: dict[str, models.ModelCapacity] = {}
    for capacity in capacities:
        if capacity.free > 0 and capacity.model not in chosen:
            chosen[capacity.model] = capacity
    if limit <= 0 or not chosen:
        return None
    order = list(chosen.values())
    random.shuffle(order)  # when `limit` cuts, no model is always served last
    return ClaimPlan(
        models=[capacity.model for capacity in order],
        free=[min(capacity.free, limit) for capacity in order],
        limits=[capacity.limit for capacity in order],
        lock_keys=sorted({model_lock_key(c.model) for c in order if c.limit is not None}),
        total=limit,
    )


async def lock_models(connection: Connection, plan: ClaimPlan) -> None:
    """Take the per-model advisory locks (inside a transaction, before `claim`'s statement)."""
    await connection.execute(_LOCK_MODELS, plan.lock_keys)


async def claim(
    connection: Connection,
    plan: ClaimPlan,
    daemon_id: ids.DaemonId,
    *,
    owner_in_flight: Mapping[str, int] | None,
    now: datetime,
) -> list[models.ClaimedRequest]:
    arguments: list[object] = [plan.models, plan.free, plan.limits, now, plan.total, daemon_id]
    busy_owners = {owner: count for owner, count in (owner_in_flight or {}).items() if count > 0}
    if busy_owners:
        found = await connection.fetch(_CLAIM_BY_OWNER, *arguments, list(busy_owners), list(busy_owners.values()))
    else:
        # With no owner in flight, fairness orders exactly like the deadline order.
        found = await connection.fetch(_CLAIM, *arguments)
    return rows.claimed_from_rows(found, daemon_id=daemon_id, claimed_at=now)


async def vacuum(connection: Connection) -> None:
    """Vacuum the requests table (outside a transaction), unless another vacuum of it runs (`SKIP_LOCKED`).
    It removes the dead index entries that claims would otherwise walk (`base.RequestQueue.maintain_queue`).
    A role that does not own the table gets a warning from the server, not an error."""
    await connection.execute(_VACUUM, timeout=VACUUM_TIMEOUT_S)


async def cancelling_requests(connection: Connection, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
    found = await connection.fetch(_CANCELLING_REQUESTS, daemon_id)
    return [ids.RequestId(rows.plain_uuid(row["id"])) for row in found]


async def held_requests(connection: Connection, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
    found = await connection.fetch(_HELD_REQUESTS, daemon_id)
    return [ids.RequestId(rows.plain_uuid(row["id"])) for row in found]
