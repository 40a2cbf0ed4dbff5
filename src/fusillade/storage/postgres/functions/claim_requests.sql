-- claim_requests: the claim of `queue.claim`, one call in its own transaction.
-- version: 3
--
-- This file is the function's one definition. `fusillade migrate` runs it (under the migration lock, after the
-- migrations) when the database holds an older version or none, and records the version in `schema_functions`;
-- it leaves a newer version in place, so an older release migrating beside a newer one does not bring its own
-- function back. Raise the version with every change, and keep the signature: a new one would add a second
-- function beside this one (drop the old one in a migration once no release calls it).
-- History: version 1 was written in migration 0001_initial, version 2 (the plain path taken when fairness does
-- not change the order) in 0003_claim_fast_path. Version 3 added `model_rates` and the `bucket_tokens` column: a
-- new signature, so it stands beside version 2's nine-argument function, which a release older than this one
-- still calls (drop it in a migration once none does).
--
-- 0. A daemon marked dead may not claim (its requests may already have gone to others): SQLSTATE 55000.
-- 1. Models with a shared limit: per-model transaction advisory locks, taken in key order (two claimers cannot
--    deadlock), serialise their claims; then, in a new snapshot, so counting every claim committed before the
--    locks were granted, each such model's take is capped by its limit minus what is in flight across daemons.
-- 1b. Models with a rate limit (`model_rates`; NULL when no model has one, and this step costs nothing): the
--    bucket of each (`model_rate_buckets`, under the same lock) is refilled to the claim's time and caps the take
--    at its whole tokens; the claim statement spends one token per request it claimed (a data-modifying CTE, so
--    the bucket and the claim commit together), and the levels after the claim come back as extra rows at the
--    end (id NULL, `model`, `bucket_tokens`), from which the daemon knows when the next token is due.
--    The arithmetic is `domain.rate_limit`'s: capacity GREATEST(1, rate / 120), refill rate / 60 a second.
-- 2. Fairness (owners with fewer requests in flight first) costs a skip scan of the owners and a lock on each
--    owner's first rows per claim. When every owner with pending requests of a wanted model has as many requests
--    in flight (the common case: one tenant), the fair order is the deadline order: take the plain path.
-- 3. ONE statement walks each model's pending requests in order (`FOR UPDATE SKIP LOCKED`: concurrent claimers
--    get disjoint rows) and marks them claimed. No join with batches: a batch that is cancelled, expired,
--    finished or deleted has no pending requests (those operations end them). The only exception is a request
--    that a daemon rescheduled while its batch was being cancelled; finalize_batches cancels such leftovers.
-- `enable_sort = off`: the walk must follow the claim indexes (`requests_claim`, `requests_claim_by_owner`),
-- whatever the statistics say. On a table with none yet, or with statistics taken before a large batch arrived,
-- the planner estimates a handful of pending rows and would rather collect and sort every pending row of the
-- model on each claim. `tests/integration/test_claim_plans.py` checks the plans.

CREATE OR REPLACE FUNCTION claim_requests(
    wanted_models   text[],     -- models in the order they are served
    wanted_free     integer[],  -- the daemon's free slots per model
    model_limits    integer[],  -- each model's limit across daemons (NULL: none)
    claim_time      timestamptz,
    claim_limit     integer,    -- at most this many requests in total
    claimer         uuid,       -- the daemon
    model_lock_keys bigint[],   -- advisory lock keys of the models with a limit, sorted
    busy_owners     text[],     -- owners with requests in flight (NULL: deadline order only) ...
    busy_counts     integer[],  -- ... and how many each has
    model_rates     integer[]   -- each model's requests per minute (NULL: none; the array NULL: no model has one)
)
RETURNS TABLE (
    id uuid, batch_id uuid, owner text, custom_id text, model text, method text, url text, body text,
    attempt integer, deadline timestamptz, bucket_tokens double precision
)
LANGUAGE plpgsql
SET enable_sort = off
AS $$
#variable_conflict use_column
DECLARE
    takes integer[] := wanted_free;
    levels double precision[];  -- the bucket of each wanted model refilled to claim_time (NULL: no rate limit)
BEGIN
    IF EXISTS (SELECT 1 FROM daemons d WHERE d.id = claimer AND d.status = 'dead') THEN
        RAISE EXCEPTION 'daemon % was marked dead', claimer USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF cardinality(model_lock_keys) > 0 THEN
        PERFORM pg_advisory_xact_lock(key) FROM unnest(model_lock_keys) AS key;
        SELECT array_agg(
                   CASE WHEN w.model_limit IS NULL THEN w.free
                        ELSE GREATEST(0, LEAST(w.free, w.model_limit - (
                            SELECT count(*) FROM requests f WHERE f.model = w.model AND f.state = 'in_flight'
                        )))
                   END
                   ORDER BY w.position
               )
        INTO takes
        FROM unnest(wanted_models, wanted_free, model_limits)
            WITH ORDINALITY AS w(model, free, model_limit, position);
    END IF;
    IF model_rates IS NOT NULL THEN
        SELECT array_agg(l.level ORDER BY l.position),
               array_agg(CASE WHEN l.level IS NULL THEN l.take
                              ELSE LEAST(l.take, GREATEST(0, floor(l.level + 1e-6)::integer)) END
                         ORDER BY l.position)
        INTO levels, takes
        FROM (
            SELECT w.position, w.take,
                   CASE WHEN w.rate IS NULL THEN NULL
                        WHEN b.model IS NULL THEN GREATEST(1, w.rate / 120)::double precision
                        ELSE LEAST(GREATEST(1, w.rate / 120)::double precision,
                                   b.tokens + w.rate / 60.0::double precision
                                   * GREATEST(0, extract(epoch FROM claim_time - b.updated_at))::double precision)
                   END AS level
            FROM unnest(wanted_models, takes, model_rates) WITH ORDINALITY AS w(model, take, rate, position)
            LEFT JOIN model_rate_buckets b ON b.model = w.model
        ) l;
    END IF;
    IF cardinality(busy_owners) = 1 AND NOT EXISTS (
        -- One busy owner (one tenant at work, the usual case): is any other owner pending? Two probes around
        -- its range of the by-owner index, which skip the dead entries of its own claimed requests.
        SELECT 1 FROM unnest(wanted_models, takes) AS w(model, take)
        WHERE w.take > 0 AND (
            EXISTS (SELECT 1 FROM requests r
                    WHERE r.state = 'pending' AND r.model = w.model AND r.owner < busy_owners[1])
            OR EXISTS (SELECT 1 FROM requests r
                       WHERE r.state = 'pending' AND r.model = w.model AND r.owner > busy_owners[1])
        )
    ) THEN
        busy_owners := NULL;
    ELSIF busy_owners IS NOT NULL AND NOT EXISTS (
        -- Fairness changes the order only if owners with pending requests of a wanted model differ in load.
        WITH RECURSIVE owners AS (
            SELECT w.model,
                   (SELECT min(r.owner) FROM requests r WHERE r.state = 'pending' AND r.model = w.model) AS owner
            FROM unnest(wanted_models, takes) AS w(model, take)
            WHERE w.take > 0
            UNION ALL
            SELECT o.model,
                   (SELECT min(r.owner) FROM requests r
                    WHERE r.state = 'pending' AND r.model = o.model AND r.owner > o.owner)
            FROM owners o
            WHERE o.owner IS NOT NULL
        )
        SELECT 1
        FROM owners o
        LEFT JOIN unnest(busy_owners, busy_counts) AS f(owner, in_flight) ON f.owner = o.owner
        WHERE o.owner IS NOT NULL
        GROUP BY o.model
        HAVING count(DISTINCT COALESCE(f.in_flight, 0)) > 1
    ) THEN
        busy_owners := NULL;
    END IF;
    IF busy_owners IS NULL THEN
        RETURN QUERY
        WITH picked AS (
            SELECT p.ctid
            FROM unnest(wanted_models, takes) WITH ORDINALITY AS w(model, take, position)
            CROSS JOIN LATERAL (
                SELECT r.ctid
                FROM requests r
                WHERE r.model = w.model AND r.state = 'pending'
                  AND (r.not_before IS NULL OR r.not_before <= claim_time)
                ORDER BY r.deadline, r.batch_id, r.line_number
                LIMIT w.take
                FOR UPDATE OF r SKIP LOCKED
            ) p
            LIMIT claim_limit
        ),
        claimed AS (
            -- By the locked rows' ctids: a TID scan whatever the planner guesses of how many rows were picked.
            UPDATE requests r
            SET state = 'in_flight', daemon_id = claimer, claimed_at = claim_time
            WHERE r.ctid = ANY(ARRAY(SELECT ctid FROM picked))
            RETURNING r.id, r.batch_id, r.owner, r.custom_id, r.model, r.template_id, r.attempt, r.deadline
        ),
        debited AS (
            -- Nothing to do without rate limits: `levels` is NULL and the planner drops this part.
            INSERT INTO model_rate_buckets AS b (model, tokens, updated_at)
            SELECT w.model, w.level - COALESCE(n.claimed, 0), claim_time
            FROM unnest(wanted_models, levels) AS w(model, level)
            LEFT JOIN (SELECT c.model, count(*) AS claimed FROM claimed c GROUP BY c.model) n ON n.model = w.model
            WHERE levels IS NOT NULL AND w.level IS NOT NULL
            ON CONFLICT (model) DO UPDATE
            SET tokens = excluded.tokens, updated_at = GREATEST(b.updated_at, excluded.updated_at)
        )
        SELECT c.id, c.batch_id, c.owner, c.custom_id, c.model, t.method, t.url, t.body, c.attempt, c.deadline,
               NULL::double precision
        FROM claimed c
        JOIN request_templates t ON t.id = c.template_id;
    ELSE
        -- Fair order, (owner's requests in flight, deadline, batch, line), without sorting every pending row:
        -- find the owners with pending requests of each model (a skip scan of requests_claim_by_owner), lock
        -- each owner's first `take` eligible rows in deadline order, then keep the first `take` of those per
        -- model in the fair order. Rows locked but not kept are released at commit; meanwhile other claimers
        -- skip them.
        RETURN QUERY
        WITH RECURSIVE wanted AS (
            SELECT w.model, w.take, w.position
            FROM unnest(wanted_models, takes) WITH ORDINALITY AS w(model, take, position)
        ),
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
            LEFT JOIN unnest(busy_owners, busy_counts) AS f(owner, in_flight) ON f.owner = o.owner
            CROSS JOIN LATERAL (
                SELECT r.ctid, r.deadline, r.batch_id, r.line_number
                FROM requests r
                WHERE r.model = o.model AND r.owner = o.owner AND r.state = 'pending'
                  AND (r.not_before IS NULL OR r.not_before <= claim_time)
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
            SELECT ctid FROM ranked WHERE rank <= take ORDER BY position, rank LIMIT claim_limit
        ),
        claimed AS (
            UPDATE requests r
            SET state = 'in_flight', daemon_id = claimer, claimed_at = claim_time
            WHERE r.ctid = ANY(ARRAY(SELECT ctid FROM picked))
            RETURNING r.id, r.batch_id, r.owner, r.custom_id, r.model, r.template_id, r.attempt, r.deadline
        ),
        debited AS (
            -- Nothing to do without rate limits: `levels` is NULL and the planner drops this part.
            INSERT INTO model_rate_buckets AS b (model, tokens, updated_at)
            SELECT w.model, w.level - COALESCE(n.claimed, 0), claim_time
            FROM unnest(wanted_models, levels) AS w(model, level)
            LEFT JOIN (SELECT c.model, count(*) AS claimed FROM claimed c GROUP BY c.model) n ON n.model = w.model
            WHERE levels IS NOT NULL AND w.level IS NOT NULL
            ON CONFLICT (model) DO UPDATE
            SET tokens = excluded.tokens, updated_at = GREATEST(b.updated_at, excluded.updated_at)
        )
        SELECT c.id, c.batch_id, c.owner, c.custom_id, c.model, t.method, t.url, t.body, c.attempt, c.deadline,
               NULL::double precision
        FROM claimed c
        JOIN request_templates t ON t.id = c.template_id;
    END IF;
    IF levels IS NOT NULL THEN
        RETURN QUERY
        SELECT NULL::uuid, NULL::uuid, NULL::text, NULL::text, b.model, NULL::text, NULL::text, NULL::text,
               NULL::integer, NULL::timestamptz, b.tokens
        FROM model_rate_buckets b
        WHERE b.model = ANY(wanted_models) AND b.model IN (
            SELECT w.model FROM unnest(wanted_models, levels) AS w(model, level) WHERE w.level IS NOT NULL
        );
    END IF;
END
$$;
