-- The request bucket of each model with a rate limit (`requests_per_minute`), shared by every daemon: the tokens
-- it held at `updated_at` (the claim's time), refilled continuously by the claim (`claim_requests`, under the
-- model's advisory lock) and spent one per request claimed (`domain.rate_limit`). A row is made by the first
-- claim of its model; the rate itself lives in each daemon's routing table.
CREATE TABLE model_rate_buckets (
    model      text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at timestamptz NOT NULL
);
