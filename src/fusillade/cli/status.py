"""`fusillade status`: the latest batches with their progress, and the daemons with their heartbeats, read
straight from the database (every owner's batches: it is an operator's view)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from fusillade.cli import common
from fusillade.domain import ids, models, states
from fusillade.storage.base import Storage

_BATCH_COLUMNS = ("batch", "owner", "status", "done", "failed", "in flight", "created")
_DAEMON_COLUMNS = ("daemon", "host:pid", "status", "in flight", "heartbeat", "started")


@dataclass(frozen=True, slots=True)
class Snapshot:
    batches: list[models.Batch]
    daemons: list[models.Daemon]
    daemon_total: int
    now: datetime


def status(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most batches and daemons shown.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    config: common.ConfigOption = None,
    database_url: common.DatabaseUrlOption = None,
) -> None:
    """Show the latest batches with their progress and the daemons with their heartbeats."""
    settings = common.load(config, FUSILLADE_DATABASE_URL=("--database-url", database_url))
    snapshot = common.execute(common.using_storage(settings.database_url, lambda storage: _read(storage, limit)))
    stale_after = settings.daemon.stale_after
    if as_json:
        document = {
            "database_url": settings.redacted()["database_url"],
            "batches": [_batch_json(batch) for batch in snapshot.batches],
            "daemons": [_daemon_json(daemon, snapshot.now, stale_after) for daemon in snapshot.daemons],
        }
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    common.stdout.print(f"Database: {settings.redacted()['database_url']}", highlight=False, markup=False)
    common.stdout.print(_batch_table(snapshot))
    common.stdout.print(_daemon_table(snapshot, stale_after))


async def _read(storage: Storage, limit: int) -> Snapshot:
    batches = await storage.list_batches(owner=models.ALL_OWNERS, limit=limit)
    daemons = await storage.list_daemons()
    return Snapshot(list(batches.items), daemons[:limit], len(daemons), datetime.now(UTC))


# ------------------------------------------------------------------------------------------------- tables


def _batch_table(snapshot: Snapshot) -> Table | str:
    if not snapshot.batches:
        return "No batches yet."
    table = common.table("Batches (newest first)", *_BATCH_COLUMNS)
    for batch in snapshot.batches:
        counts = batch.counts
        table.add_row(
            ids.batch_wire(batch.id),
            batch.owner,
            _status_style(batch.status),
            _progress(counts),
            f"{counts.failed + counts.canceled:,}",
            f"{counts.in_progress:,}",
            common.age(batch.created_at, snapshot.now),
        )
    return table


def _daemon_table(snapshot: Snapshot, stale_after: timedelta) -> Table | str:
    if not snapshot.daemons:
        return "No daemon has run on this database yet."
    shown = len(snapshot.daemons)
    more = f", {snapshot.daemon_total - shown} older not shown" if snapshot.daemon_total > shown else ""
    table = common.table(f"Daemons (newest first{more})", *_DAEMON_COLUMNS)
    for daemon in snapshot.daemons:
        table.add_row(
            str(daemon.id),
            f"{daemon.hostname}:{daemon.pid}",
            _daemon_status(daemon, snapshot.now, stale_after),
            f"{daemon.in_flight:,}",
            common.age(daemon.last_heartbeat, snapshot.now),
            common.age(daemon.started_at, snapshot.now),
        )
    return table


def _progress(counts: models.RequestCounts) -> str:
    share = counts.terminal / counts.total if counts.total else 1.0
    return f"{counts.terminal:,}/{counts.total:,} ({share:.0%})"


_STATUS_STYLES = {
    states.BatchStatus.COMPLETED: "green",
    states.BatchStatus.FAILED: "red",
    states.BatchStatus.EXPIRED: "red",
    states.BatchStatus.CANCELLED: "yellow",
    states.BatchStatus.CANCELLING: "yellow",
}


def _status_style(status: states.BatchStatus) -> str:
    style = _STATUS_STYLES.get(status)
    return f"[{style}]{status}[/]" if style else str(status)


def _daemon_status(daemon: models.Daemon, now: datetime, stale_after: timedelta) -> str:
    if daemon.status is states.DaemonStatus.DEAD:
        return "[dim]dead[/]"
    if _silent(daemon, now, stale_after):
        return "[yellow]silent[/]"
    return "[green]running[/]"


def _silent(daemon: models.Daemon, now: datetime, stale_after: timedelta) -> bool:
    return daemon.status is states.DaemonStatus.RUNNING and now - daemon.last_heartbeat > stale_after


# --------------------------------------------------------------------------------------------------- json


def _batch_json(batch: models.Batch) -> dict[str, Any]:
    counts = batch.counts
    return {
        "id": ids.batch_wire(batch.id),
        "owner": batch.owner,
        "status": str(batch.status),
        "endpoint": batch.endpoint,
        "created_at": common.unix(batch.created_at),
        "expires_at": common.unix(batch.expires_at),
        "request_counts": {
            "total": counts.total,
            "pending": counts.pending,
            "in_progress": counts.in_progress,
            "completed": counts.completed,
            "failed": counts.failed,
            "canceled": counts.canceled,
        },
    }


def _daemon_json(daemon: models.Daemon, now: datetime, stale_after: timedelta) -> dict[str, Any]:
    return {
        "id": str(daemon.id),
        "hostname": daemon.hostname,
        "pid": daemon.pid,
        "version": daemon.version,
        "status": str(daemon.status),
        "silent": _silent(daemon, now, stale_after),
        "in_flight": daemon.in_flight,
        "started_at": common.unix(daemon.started_at),
        "last_heartbeat": common.unix(daemon.last_heartbeat),
        "stopped_at": common.unix(daemon.stopped_at),
    }
