-- A batch's budget (`storage/budgets.py`: limits and the pricing of its models, as JSON), and when its completed
-- requests reached it: its pending requests then ended failed with `budget_exceeded`, and any handed back to the
-- queue since end so too.
ALTER TABLE batches ADD COLUMN budget TEXT;
ALTER TABLE batches ADD COLUMN budget_exceeded_at INTEGER;
