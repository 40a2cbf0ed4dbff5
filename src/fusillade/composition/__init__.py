"""The composition root: the one place that builds fusillade's concrete parts (a storage backend, the upstream
client, the daemon, the service, the HTTP servers) from a `Config`, for every command that runs them.

```
 fusillade serve   ->  serving.serve(config)                   HTTP API + a supervised daemon process
 fusillade api     ->  serving.serve(config, with_daemon=False) HTTP API only (replicas share PostgreSQL)
 fusillade daemon  ->  daemon_process.run_daemon(config)       a daemon alone (also serve's daemon process)
 fusillade run     ->  parts.open_run_parts(config, ...)       storage, service, client and daemon of one run
 keys, status, migrate -> database.open_storage(config)        the database alone
```

Modules, lightest first (a short command imports only what it needs, never the HTTP stack):
- `database`: `open_storage(config)`, the configuration's database with its settings (`database_timeout`).
- `routing`: the routing table in force in a process, and the models it serves.
- `parts`: the daemon and the service built from a configuration, and the parts of a `fusillade run`.
- `http`: the HTTP servers of a process (the API's, the metrics'), their sockets and limits.
- `serving`: `serve`, the HTTP API process, with its daemon process (`supervision`) or without.
- `daemon_process`: `run_daemon`, a daemon alone in its process.
- `supervision`: `serve`'s daemon in a child process: started, woken, restarted, stopped.

Nothing outside this package (and the CLI, through it) imports a storage backend or builds a `Daemon` for a
command; `tests/test_architecture.py` checks it.
"""

from __future__ import annotations

LOCAL_OWNER = "local"
"""The owner of everything created through an API that has no keys, and by `fusillade run`."""
