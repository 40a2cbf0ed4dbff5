-- The concurrency limit of each model's lane at the daemon's last heartbeat (JSON: model -> limit), which an
-- adaptive limit moves; `fusillade status` shows it.
ALTER TABLE daemons ADD COLUMN limits TEXT;
