"""The request queue, the daemons' hot path: claim and cancellation lookups (fenced writes: `fenced_writes`),
and the vacuum that keeps claims fast.

Claim: one call of the `claim_requests` database function (defined once, in `functions/claim_requests.sql`,
which `migration` installs), its own transaction and one round trip: a refusal if the daemon was marked dead,
per-model advisory locks for models with a shared limit, then ONE statement that walks each model's pending rows
in order (`FOR UPDATE SKIP LOCKED`, so concurrent claimers get disjoint rows) and marks them claimed. A function,
so that the walk can be kept on the claim indexes whatever the planner's statistics say (see its header).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from fusillade import errors
from fusillade.domain import ids, models, states
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

# Columns in the order `rows.claimed_from_rows` unpacks them.
_CLAIM = "SELECT * FROM claim_requests($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::integer[])"

# A loose index scan over the pending index: one probe per distinct model instead of a walk of every row.
_PENDING_MODELS = """
WITH RECURSIVE found(model) AS (
    (SELECT model FROM requests WHERE state = 'pending' ORDER BY model LIMIT 1)
    UNION ALL
    SELECT (SELECT r.model FROM requests r WHERE r.state = 'pending' AND r.model > found.model
            ORDER BY r.model LIMIT 1)
    FROM found WHERE found.model IS NOT NULL
)
SELECT model FROM found WHERE model IS NOT NULL
"""

# Read from requests_in_flight (model, daemon_id), which holds the in-flight rows alone.
_IN_FLIGHT_BY_MODEL = """
SELECT model, count(*) AS in_flight FROM requests WHERE state = 'in_flight' GROUP BY model
"""

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

VACUUM_MIN_DEAD_ROWS = 1000
VACUUM_DEAD_FRACTION = 0.05
"""`vacuum` runs once this fraction of the requests table (and at least `VACUUM_MIN_DEAD_ROWS` rows) died since
the table was last vacuumed. A vacuum costs about a pass over the table's indexes, a claim about a step per
request claimed since the last vacuum: vacuuming after a fixed fraction of the table has changed keeps the
two in proportion, so a large table is vacuumed less often."""

VACUUM_TIMEOUT_S = 600.0
"""Longest vacuum of the requests table (a pass over a large table's indexes outlasts the statement timeout)."""

# Statistics that other sessions report at most once a second: good enough to decide.
_DUE_FOR_VACUUM = """
SELECT s.n_dead_tup >= $1 + $2 * greatest(c.reltuples, 0)
FROM pg_stat_user_tables s
JOIN pg_class c ON c.oid = s.relid
WHERE s.relid = 'requests'::regclass
"""

_VACUUM = "VACUUM (SKIP_LOCKED) requests"


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
    """Advisory lock keys of the models with a shared limit or a rate limit, sorted."""
    total: int
    rates: list[int | None] | None = None
    """Each model's requests per minute; None when no model has a rate limit."""


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
    rated = any(capacity.requests_per_minute is not None for capacity in order)
    return ClaimPlan(
        models=[capacity.model for capacity in order],
        free=[min(capacity.free, limit) for capacity in order],
        limits=[capacity.limit for capacity in order],
        lock_keys=sorted(
            {model_lock_key(c.model) for c in order if c.limit is not None or c.requests_per_minute is not None}
        ),
        total=limit,
        rates=[capacity.requests_per_minute for capacity in order] if rated else None,
    )


async def claim(
    connection: Connection,
    plan: ClaimPlan,
    daemon_id: ids.DaemonId,
    *,
    owner_in_flight: Mapping[str, int] | None,
    now: datetime,
) -> models.Claimed:
    busy_owners = {owner: count for owner, count in (owner_in_flight or {}).items() if count > 0}
    try:
        found = await connection.fetch(
            _CLAIM,
            plan.models,
            plan.free,
            plan.limits,
            now,
            plan.total,
            daemon_id,
            plan.lock_keys,
            # With no owner in flight, fairness orders exactly like the deadline order.
            list(busy_owners) if busy_owners else None,
            list(busy_owners.values()),
            plan.rates,
        )
    except asyncpg.ObjectNotInPrerequisiteStateError as exc:  # raised by claim_requests for a dead daemon
        raise errors.StateConflict(
            f"Daemon {daemon_id} was marked dead (its requests may have been reclaimed by others); it may not "
            "claim any more.",
            current_state=states.DaemonStatus.DEAD.value,
        ) from exc
    if plan.rates is None:
        return rows.claimed_from_rows(found, daemon_id=daemon_id, claimed_at=now)
    # The buckets' levels after the claim come last, one row each with no id.
    buckets: dict[str, float] = {}
    while found and found[-1][0] is None:
        bucket = found.pop()
        buckets[bucket["model"]] = bucket["bucket_tokens"]
    claimed = rows.claimed_from_rows(found, daemon_id=daemon_id, claimed_at=now)
    claimed.buckets = buckets
    return claimed


async def vacuum(connection: Connection) -> None:
    """Vacuum the requests table (outside a transaction) if enough of it died since its last vacuum (see
    `VACUUM_DEAD_FRACTION`), unless another vacuum of it runs (`SKIP_LOCKED`). It removes the dead index
    entries that claims would otherwise walk (`base.RequestQueue.maintain_queue`). A role that does not own
    the table gets a warning from the server, not an error."""
    if await connection.fetchval(_DUE_FOR_VACUUM, VACUUM_MIN_DEAD_ROWS, VACUUM_DEAD_FRACTION):
        await connection.execute(_VACUUM, timeout=VACUUM_TIMEOUT_S)


async def cancelling_requests(connection: Connection, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
    found = await connection.fetch(_CANCELLING_REQUESTS, daemon_id)
    return [ids.RequestId(rows.plain_uuid(row["id"])) for row in found]


async def held_requests(connection: Connection, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
    found = await connection.fetch(_HELD_REQUESTS, daemon_id)
    return [ids.RequestId(rows.plain_uuid(row["id"])) for row in found]


async def pending_models(connection: Connection) -> list[str]:
    return [row["model"] for row in await connection.fetch(_PENDING_MODELS)]


async def in_flight_by_model(connection: Connection) -> dict[str, int]:
    return {row["model"]: row["in_flight"] for row in await connection.fetch(_IN_FLIGHT_BY_MODEL)}
