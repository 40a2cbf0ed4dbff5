"""`fusillade serve`, `fusillade api` and `fusillade daemon`: the long-running processes.

The composition root's `serving` and `daemon_process` (and with them the HTTP stack) are imported inside the
commands, so that the short commands (`keys`, `status`, `migrate`) start quickly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusillade.cli import common
from fusillade.config import Config

HostOption = Annotated[
    str | None,
    typer.Option(
        "--host",
        metavar="HOST",
        help="Address to listen on (default: server.host, 127.0.0.1). Any other than loopback needs an API key.",
        show_default=False,
    ),
]
PortOption = Annotated[
    int | None,
    typer.Option(
        "--port",
        "-p",
        metavar="PORT",
        help="TCP port (default: server.port, 8080); 0 picks a free one.",
        show_default=False,
    ),
]


def serve(
    config: common.ConfigOption = None,
    host: HostOption = None,
    port: PortOption = None,
    database_url: common.DatabaseUrlOption = None,
    mock_upstream: Annotated[
        bool,
        typer.Option(
            "--mock-upstream",
            help="Also run the fake upstream in this process and send every model without a route of its own "
            "to it. For demos and first steps, not for production.",
        ),
    ] = False,
    log_level: common.LogLevelOption = "info",
) -> None:
    """Run the HTTP API and a daemon in one command.

    The main command: the OpenAI files and batches API, and the daemon that sends the requests upstream in a
    process of its own that this one supervises; SQLite by default (./fusillade.db).
    """
    common.setup_logging(log_level)
    settings = _load(config, host, port, database_url)
    from fusillade.composition import serving

    common.execute(serving.serve(settings, mock_upstream=mock_upstream))


def api(
    config: common.ConfigOption = None,
    host: HostOption = None,
    port: PortOption = None,
    database_url: common.DatabaseUrlOption = None,
    log_level: common.LogLevelOption = "info",
) -> None:
    """Run the HTTP API alone.

    For several replicas: API processes and `fusillade daemon` processes sharing one PostgreSQL database.
    """
    common.setup_logging(log_level)
    settings = _load(config, host, port, database_url)
    from fusillade.composition import serving

    common.execute(serving.serve(settings, with_daemon=False))


def daemon(
    config: common.ConfigOption = None,
    database_url: common.DatabaseUrlOption = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            metavar="PORT",
            help="Serve the daemon's Prometheus metrics on this port at /metrics (default: not served).",
            show_default=False,
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", metavar="HOST", help="Address of the metrics endpoint.")
    ] = "127.0.0.1",
    log_level: common.LogLevelOption = "info",
) -> None:
    """Run a daemon alone: it sends stored requests upstream.

    Several daemons may share one PostgreSQL database; each model's limit holds across all of them.
    """
    common.setup_logging(log_level)
    settings = common.load(config, FUSILLADE_DATABASE_URL=("--database-url", database_url))
    address = (metrics_host, metrics_port) if metrics_port is not None else None
    from fusillade.composition import daemon_process

    common.execute(daemon_process.run_daemon(settings, metrics_address=address))


def _load(config: Path | None, host: str | None, port: int | None, database_url: str | None) -> Config:
    return common.load(
        config,
        FUSILLADE_DATABASE_URL=("--database-url", database_url),
        FUSILLADE_SERVER__HOST=("--host", host),
        FUSILLADE_SERVER__PORT=("--port", port),
    )
