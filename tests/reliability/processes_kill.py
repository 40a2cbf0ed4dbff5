"""The kill -9 loop's tools: `fusillade daemon` as a real process (a TOML configuration file written for it,
started as an operator starts it, killed with SIGKILL, restarted, stopped with SIGTERM), and what the loop reads
from the database between kills (the requests a dead daemon still holds, the completed results, SQLite's
integrity check, PostgreSQL sessions still open).

Each process is `python -m fusillade daemon --config FILE` started by `tests.support.processes` (`start_daemon`):
its stderr in a log file of the test's directory and no `FUSILLADE_*` variable in its environment, so only the
configuration file steers it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import struct
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from fusillade.domain import ids, models, states
from fusillade.storage import base
from tests.support import backends, factories, polling
from tests.support.processes import Process, Processes

START_WITHIN = 30.0
"""Seconds a daemon gets to register after it was started (a cold interpreter, two busy cores)."""
STOP_WITHIN = 20.0
"""Seconds a daemon gets to exit after SIGTERM before it is killed."""
LOGS_SHOWN = 3
"""Logs shown under a failure: those of the last few daemons (the loop starts one after every kill)."""

DAEMON_SETTINGS = {
    # Short enough that a restart picks the work up within a couple of seconds, long enough that a daemon
    # starved of CPU for a moment (two cores shared with other tests) is not declared dead by its own sweep.
    "heartbeat_interval": "200ms",
    "stale_after": "2s",
    "maintenance_interval": "100ms",
    "idle_poll_interval": "100ms",
    "cancellation_poll_interval": "100ms",
    "shutdown_grace": "5s",
    "database_backoff_max": "500ms",
    "purge_interval": "none",
}


def database_url(backend: backends.Backend, *, application_name: str | None = None) -> str:
    """The backend's database as a `database_url`; on PostgreSQL tagged with `application_name`, so that the
    sessions of one process can be told from the others in `pg_stat_activity`."""
    if not backend.is_postgres:
        return f"sqlite:///{backend.location}"
    if application_name is None:
        return backend.location
    separator = "&" if "?" in backend.location else "?"
    return f"{backend.location}{separator}application_name={application_name}"


def write_config(path: Path, *, database: str, upstream_url: str, model: str, concurrency: int) -> Path:
    """A configuration file routing `model` to the upstream, with the daemon's timers shortened."""
    lines = [f"database_url = {json.dumps(database)}", "", "[daemon]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in DAEMON_SETTINGS.items()]
    lines += ["", "[daemon.retry]", 'base_delay = "20ms"', 'max_delay = "200ms"', ""]
    lines += [f"[models.{json.dumps(model)}]", f"base_url = {json.dumps(upstream_url)}"]
    lines += [f"concurrency = {concurrency}", ""]
    path.write_text("\n".join(lines))
    return path


def start_daemon(daemons: Processes, config: Path, name: str) -> Process:
    """`fusillade daemon --config CONFIG --log-level info`, started among `daemons` (made with
    `stop_within=STOP_WITHIN`)."""
    return daemons.start(name, "daemon", "--config", str(config), "--log-level", "info")


async def registered(storage: base.Storage, process: Process, *, known: set[ids.DaemonId]) -> ids.DaemonId:
    """The id under which the process registered (a running daemon with its pid, not one of `known`), once it
    has: by then it has opened the database (SQLite: recovered its write-ahead log)."""

    async def find() -> ids.DaemonId | None:
        process.check_running()
        for daemon in await storage.list_daemons():
            if (
                daemon.pid == process.pid
                and daemon.status == states.DaemonStatus.RUNNING
                and daemon.id not in known
            ):
                return daemon.id
        return None

    found = await polling.until(find, within=START_WITHIN, interval=0.05, message=f"{process.name} to register")
    assert found is not None
    return found


async def declared_dead(storage: base.Storage, daemon_id: ids.DaemonId, process: Process) -> None:
    """Wait until a running daemon (`process`) has declared `daemon_id` dead after the heartbeat threshold, and
    with that released the requests it held."""

    async def dead() -> bool:
        process.check_running()
        return any(
            daemon.id == daemon_id and daemon.status == states.DaemonStatus.DEAD
            for daemon in await storage.list_daemons()
        )

    await polling.until(dead, within=START_WITHIN, interval=0.01, message=f"daemon {daemon_id} declared dead")


class CompletedReader:
    """Reads the batch's completed requests straight from the tables, each time only those finished since the
    last read (less a margin): cheap enough to run just before a kill without letting the daemon run far past
    the kill point. `finished_at` comes from the writer's clock when its transaction ran, and two transactions
    may commit in another order than they started: the margin (far longer than a transaction) catches those."""

    MARGIN = timedelta(milliseconds=500)

    def __init__(self, backend: backends.Backend, batch: models.Batch, admin: asyncpg.Connection | None) -> None:
        self._backend = backend
        self._batch = batch
        self._admin = admin
        self._since: datetime | None = None

    async def read(self) -> dict[str, str | None]:
        """{custom_id: response body} of requests completed since the last read, committed as of now."""
        since = self._since - self.MARGIN if self._since is not None else datetime.min.replace(tzinfo=UTC)
        if self._admin is not None:
            rows = await self._admin.fetch(
                "SELECT custom_id, response_body, finished_at FROM requests "
                "WHERE batch_id = $1 AND state = 'completed' AND finished_at >= $2",
                self._batch.id,
                since,
            )
            found = [(row["custom_id"], row["response_body"], row["finished_at"]) for row in rows]
        else:
            found = await asyncio.to_thread(self._read_sqlite, since)
        if found:
            latest = max(finished for _, _, finished in found)
            self._since = latest if self._since is None else max(self._since, latest)
        return {custom_id: body for custom_id, body, _ in found}

    def _read_sqlite(self, since: datetime) -> list[tuple[str, str | None, datetime]]:
        connection = sqlite3.connect(self._backend.location, timeout=10)
        try:
            rows = connection.execute(
                "SELECT custom_id, response_body, finished_at FROM requests "
                "WHERE batch_id = ? AND state = 'completed' AND finished_at >= ?",
                (self._batch.id.bytes, max(0, int((since - _EPOCH) / timedelta(microseconds=1)))),
            ).fetchall()
        finally:
            connection.close()
        return [(custom_id, body, _EPOCH + timedelta(microseconds=micros)) for custom_id, body, micros in rows]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def held_by(storage: base.Storage, batch: models.Batch, daemon_id: ids.DaemonId) -> set[str]:
    """The custom ids of the batch's requests claimed or processing in the name of `daemon_id`."""
    held: set[str] = set()
    for state in (states.RequestState.CLAIMED, states.RequestState.PROCESSING):
        for request in await factories.all_requests(storage, batch.id, state=state):
            if request.daemon_id == daemon_id:
                held.add(request.custom_id)
    return held


async def requests_by_custom_id(storage: base.Storage, batch: models.Batch) -> dict[str, models.Request]:
    """Every request of the batch, through the storage layer (a reader like the API's)."""
    return {request.custom_id: request for request in await factories.all_requests(storage, batch.id)}


async def sessions_gone(connection: asyncpg.Connection, application_name: str) -> None:
    """Wait until PostgreSQL has ended every session of a killed process (its backends noticed the closed
    sockets): from then on nothing it sent can still commit."""

    async def none_left() -> bool:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name
        )
        return bool(count == 0)

    await polling.until(none_left, within=10, interval=0.01, message=f"the sessions of {application_name} to end")


async def in_transaction(connection: asyncpg.Connection, application_name: str) -> bool:
    """Whether a session of the process has a transaction open (a tick: group commit and claim, a heartbeat, a
    sweep) at this moment, as PostgreSQL reports it."""
    count = await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND xact_start IS NOT NULL",
        application_name,
    )
    return bool(count)


SQLITE_WRITE_LOCK_BYTE = 120
"""The byte of the `-shm` file a writer locks from `BEGIN IMMEDIATE` to its end (the WAL write lock: the first of
the lock bytes at offset 120, https://www.sqlite.org/walformat.html)."""


def write_lock_held(database: str) -> bool:
    """Whether another process holds SQLite's write lock on `database` now, i.e. is inside a write transaction
    (a tick: group commit and claim, a heartbeat, a sweep). Asks the kernel (`F_GETLK`) without taking the lock.
    Linux only (the layout of `struct flock` differs elsewhere): False on other systems."""
    if sys.platform != "linux":
        return False
    try:
        descriptor = os.open(f"{database}-shm", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (native alignment, padded to 8 bytes).
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, SQLITE_WRITE_LOCK_BYTE, 1, 0)
        probe += bytes(-len(probe) % 8)
        answer = fcntl.fcntl(descriptor, fcntl.F_GETLK, probe)
        return struct.unpack_from("h", answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(descriptor)


def integrity_check(path: str) -> list[str]:
    """`PRAGMA integrity_check` on a new connection (which also replays the write-ahead log): ["ok"] if sound."""
    connection = sqlite3.connect(path, timeout=10)
    try:
        return [row[0] for row in connection.execute("PRAGMA integrity_check")]
    finally:
        connection.close()
