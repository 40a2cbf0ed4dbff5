"""`fusillade status`: the routes of the configuration with the requests in flight on each, the latest batches
with their progress, and the daemons with their heartbeats, read straight from the database (every owner's
batches: it is an operator's view). An upstream is shown as its host and port only: the rest of its URL may hold
a secret."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from fusillade.cli import common, tokens
from fusillade.config import DEFAULT_ROUTE_MODEL, Config
from fusillade.domain import endpoint_pool, ids, models, states
from fusillade.domain.prices import Prices
from fusillade.domain.usage import cost_fields, openai_usage
from fusillade.storage.base import Storage

_ROUTE_COLUMNS = ("model", "upstream", "limit", "in flight")
_BATCH_COLUMNS = ("batch", "owner", "status", "done", "failed", "in flight", "tokens")
_DAEMON_COLUMNS = ("daemon", "host:pid", "status", "in flight", "heartbeat", "started")


@dataclass(frozen=True, slots=True)
class Snapshot:
    batches: list[models.Batch]
    daemons: list[models.DaemonRecord]
    daemon_total: int
    in_flight: dict[str, int]
    """Requests in flight per model, across every daemon."""
    now: datetime


@dataclass(frozen=True, slots=True)
class RouteRow:
    model: str
    """The model, or `*` for the default route."""
    upstream: str
    """`host:port` of the upstream (of each endpoint of a pool, comma-separated)."""
    concurrency: int
    """The route's limit (the default route's: per model)."""
    in_flight: int
    """Requests in flight on this route across every daemon (the default route's: of every model without a
    route of its own)."""
    min_concurrency: int | None = None
    """An adaptive route's floor (`concurrency` is then its ceiling); None: a fixed limit."""
    limits_now: tuple[int, ...] = ()
    """An adaptive route's limit now, as each running daemon reported it at its last heartbeat."""


def status(
    limit: Annotated[
        int, typer.Option("--limit", "-n", metavar="N", min=1, help="Most batches and daemons shown.")
    ] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    config: common.ConfigOption = None,
    database_url: common.DatabaseUrlOption = None,
) -> None:
    """Show the routes, the latest batches and the daemons.

    Reads the database directly, every owner's batches: an operator's view. Routes come with the requests in
    flight on each (across daemons), batches with their progress, daemons with their heartbeats.
    """
    settings = common.load(config, FUSILLADE_DATABASE_URL=("--database-url", database_url))
    snapshot = common.execute(common.using_storage(settings, lambda storage: _read(storage, limit)))
    stale_after = settings.daemon.stale_after
    routes = route_rows(settings, snapshot.in_flight, _limits_now(snapshot, stale_after))
    prices = settings.prices()
    if as_json:
        document = {
            "database_url": settings.redacted()["database_url"],
            "routes": [dataclasses.asdict(route) for route in routes],
            "batches": [_batch_json(batch, prices) for batch in snapshot.batches],
            "daemons": [_daemon_json(daemon, snapshot.now, stale_after) for daemon in snapshot.daemons],
        }
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    common.stdout.print(f"Database: {settings.redacted()['database_url']}", highlight=False, markup=False)
    common.stdout.print(_route_table(routes))
    common.stdout.print(_batch_table(snapshot, prices))
    common.stdout.print(_daemon_table(snapshot, stale_after))


async def _read(storage: Storage, limit: int) -> Snapshot:
    batches = await storage.list_batches(owner=models.ALL_OWNERS, limit=limit)
    daemons = await storage.list_daemons()
    in_flight = await storage.in_flight_by_model()
    return Snapshot(list(batches.items), daemons[:limit], len(daemons), in_flight, datetime.now(UTC))


def route_rows(
    config: Config, in_flight: Mapping[str, int], limits_now: Mapping[str, Sequence[int]] | None = None
) -> list[RouteRow]:
    """The configuration's routes in model order, then the default route (`*`) if there is one, each with what
    is in flight on it, and for an adaptive route its bounds and its limit now (`limits_now`: per model, as the
    running daemons reported it)."""
    own = {name: section for name, section in config.models.items() if name != DEFAULT_ROUTE_MODEL}
    rows = [
        RouteRow(
            name,
            upstream_addresses(section.base_urls),
            section.concurrency,
            in_flight.get(name, 0),
            section.min_concurrency if section.adaptive else None,
            tuple((limits_now or {}).get(name, ())) if section.adaptive else (),
        )
        for name, section in sorted(own.items())
    ]
    default = config.default_route or config.models.get(DEFAULT_ROUTE_MODEL)
    if default is not None:
        others = sum(count for model, count in in_flight.items() if model not in own)
        floor = default.min_concurrency if default.adaptive else None
        rows.append(
            RouteRow(
                DEFAULT_ROUTE_MODEL, upstream_addresses(default.base_urls), default.concurrency, others, floor
            )
        )
    return rows


def _limits_now(snapshot: Snapshot, stale_after: timedelta) -> dict[str, list[int]]:
    """Each model's limit as every running daemon last reported it."""
    found: dict[str, list[int]] = {}
    for daemon in snapshot.daemons:
        if daemon.status is states.DaemonStatus.RUNNING and not _silent(daemon, snapshot.now, stale_after):
            for model, limit in daemon.limits.items():
                found.setdefault(model, []).append(limit)
    return found


def upstream_address(base_url: str) -> str:
    """`host:port` of an upstream URL (`[v6]:port` for an IPv6 address), the scheme's port when none is
    written; never its path, which may hold a secret."""
    return endpoint_pool.address(base_url)


def upstream_addresses(base_urls: Sequence[str]) -> str:
    """`host:port` of each endpoint of a route, comma-separated (`a:8000, b:8000` for a pool)."""
    return ", ".join(upstream_address(url) for url in base_urls)


# ------------------------------------------------------------------------------------------------- tables


def _route_table(routes: list[RouteRow]) -> Table | str:
    if not routes:
        return "No routes: the configuration serves no model."
    table = common.table("Routes (in flight: across every daemon)", *_ROUTE_COLUMNS)
    for route in routes:
        limit = f"{route.concurrency:,}"
        if route.min_concurrency is not None:
            limit = f"adaptive {route.min_concurrency:,}-{route.concurrency:,}"
            if route.limits_now:
                limit = f"{', '.join(f'{now:,}' for now in route.limits_now)} ({limit})"
        if route.model == DEFAULT_ROUTE_MODEL:
            limit += " per model"
        table.add_row(escape(route.model), escape(route.upstream), limit, f"{route.in_flight:,}")
    return table


def _batch_table(snapshot: Snapshot, prices: Prices) -> Table | str:
    """The batches; a `cost` column when the configuration prices a model."""
    if not snapshot.batches:
        return "No batches yet."
    priced = prices.configured
    columns = (*_BATCH_COLUMNS, "cost") if priced else _BATCH_COLUMNS
    table = common.table("Batches (newest first)", *columns, "created")
    for batch in snapshot.batches:
        counts = batch.counts
        cells = [
            ids.batch_wire(batch.id),
            batch.owner,
            _status_style(batch.status),
            _progress(counts),
            f"{counts.failed + counts.canceled:,}",
            f"{counts.in_progress:,}",
            tokens.total(batch),
        ]
        if priced:
            cells.append(tokens.cost_cell(batch, prices))
        table.add_row(*cells, common.age(batch.created_at, snapshot.now))
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


def _daemon_status(daemon: models.DaemonRecord, now: datetime, stale_after: timedelta) -> str:
    if daemon.status is states.DaemonStatus.DEAD:
        return "[dim]dead[/]"
    if _silent(daemon, now, stale_after):
        return "[yellow]silent[/]"
    return "[green]running[/]"


def _silent(daemon: models.DaemonRecord, now: datetime, stale_after: timedelta) -> bool:
    return daemon.status is states.DaemonStatus.RUNNING and now - daemon.last_heartbeat > stale_after


# --------------------------------------------------------------------------------------------------- json


def _batch_json(batch: models.Batch, prices: Prices) -> dict[str, Any]:
    counts = batch.counts
    cost = prices.batch_cost(batch)
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
        "model": batch.model,
        "usage": openai_usage(batch.total_usage),
        "requests_without_usage": batch.usage_unknown,
        "cost": cost_fields(cost),
    }


def _daemon_json(daemon: models.DaemonRecord, now: datetime, stale_after: timedelta) -> dict[str, Any]:
    return {
        "id": str(daemon.id),
        "hostname": daemon.hostname,
        "pid": daemon.pid,
        "version": daemon.version,
        "status": str(daemon.status),
        "silent": _silent(daemon, now, stale_after),
        "in_flight": daemon.in_flight,
        "limits": dict(daemon.limits),
        "started_at": common.unix(daemon.started_at),
        "last_heartbeat": common.unix(daemon.last_heartbeat),
        "stopped_at": common.unix(daemon.stopped_at),
    }
