-- The fair claim (owners with fewer requests in flight first) walks pending requests per owner, each owner's in
-- deadline order, as on PostgreSQL. On `requests_claim` alone, skipping the rows of busy owners meant reading
-- every pending row of the model on each claim when a busy owner held them all (one tenant, one big batch).
-- Pending rows only, like `requests_claim`: claims and results never add entries here.
CREATE INDEX requests_claim_by_owner ON requests (model, owner, deadline, batch_id, line_number)
    WHERE state = 'pending';
