"""The daemon and the service built from a configuration, and the parts of one `fusillade run`: what every
command that runs batches wires the same way (no HTTP stack here)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry

from fusillade import __version__
from fusillade.composition.database import open_storage
from fusillade.composition.routing import Routing
from fusillade.config import Config
from fusillade.daemon import Daemon, DaemonSettings
from fusillade.metrics import DaemonMetrics
from fusillade.service import Service
from fusillade.storage.base import Storage
from fusillade.upstream.client import UpstreamClient


def new_daemon(
    storage: Storage,
    client: UpstreamClient,
    routing: Routing,
    *,
    settings: DaemonSettings,
    registry: CollectorRegistry,
) -> Daemon:
    """A daemon on `storage` that sends through `client` along `routing` (and follows its changes: a reload),
    its metrics in `registry`."""
    daemon = Daemon(
        storage,
        client,
        routing.routes,
        default_route=routing.default,
        settings=settings,
        metrics=DaemonMetrics(registry),
        version=__version__,
    )
    routing.on_change = daemon.replace_routes
    return daemon


@dataclasses.dataclass(frozen=True, slots=True)
class RunParts:
    """What `fusillade run` works with: its state database, the service that stores its input and batch, and
    the daemon that runs it in this process (not started: the run starts and stops it)."""

    storage: Storage
    service: Service
    daemon: Daemon
    settings: DaemonSettings
    """The daemon's settings (the run reads `stale_after` to take over an earlier run's requests)."""


@contextlib.asynccontextmanager
async def open_run_parts(config: Config, routing: Routing, *, database_url: str) -> AsyncIterator[RunParts]:
    """Open the run's state database at `database_url` (with the configuration's `database_timeout`) and the
    upstream client, build the daemon and the service; close them all when the block ends. The daemon does not
    purge (a run keeps its results until its state database is deleted)."""
    settings = dataclasses.replace(config.daemon_settings(), purge_interval=None)
    storage = await open_storage(config, database_url=database_url)
    try:
        async with UpstreamClient() as client:
            daemon = new_daemon(storage, client, routing, settings=settings, registry=CollectorRegistry())
            service = Service(
                storage,
                limits=config.upload_limits(),
                model_allowed=routing.accepts,
                spool_directory=config.uploads.spool_directory,
                notify_work=daemon.notify_work,
                prices=config.prices(),
            )
            yield RunParts(storage=storage, service=service, daemon=daemon, settings=settings)
    finally:
        await storage.close()
