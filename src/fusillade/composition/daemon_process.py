"""A daemon alone in its process: `fusillade daemon`, and the daemon process of `fusillade serve`
(`supervision` starts it there, with the API's wake-up pipe and a socket for its metrics).

Start-up order: resolve the routes (a key variable unset stops here), open (and migrate) the storage with the
daemon's write priority, serve the metrics, open the upstream client, then run the daemon until SIGTERM or
SIGINT (its own grace, then unfinished claims are released) and close the storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path

from fusillade.composition.database import open_storage
from fusillade.composition.http import bind, bind_unix, http_limits, new_registry, serving_metrics
from fusillade.composition.parts import new_daemon
from fusillade.composition.routing import Routing, no_overlay, with_mock_upstream
from fusillade.config import Config, watching
from fusillade.daemon import Daemon, run_until_signalled
from fusillade.storage.base import WritePriority
from fusillade.upstream.client import UpstreamClient

logger = logging.getLogger(__name__)

PARENT_POLL_INTERVAL = 1.0
"""Seconds between two looks at whether the serving process is still there (where the kernel does not kill
the daemon process with it)."""


async def run_daemon(
    config: Config,
    *,
    metrics_address: tuple[str, int] | None = None,
    overlay_url: str | None = None,
    wake: Connection | None = None,
    metrics_socket: Path | None = None,
    process_namespace: str = "",
    parent: int | None = None,
) -> None:
    """Run a daemon alone until SIGTERM or SIGINT (`fusillade daemon`, and `serve`'s daemon process).
    `metrics_address`: serve its Prometheus metrics over HTTP there (the HTTP API of another process cannot show
    them). For `serve`'s daemon process (`supervision`): `overlay_url` the fake upstream of `--mock-upstream`,
    `wake` the API's wake-up pipe, `metrics_socket` the Unix socket its metrics are read from, `parent` the
    serving process (the daemon stops when it is gone)."""
    overlay = functools.partial(with_mock_upstream, url=overlay_url) if overlay_url else no_overlay
    config = overlay(config)
    routing = Routing(config)
    registry = new_registry(process_namespace)
    storage = await open_storage(config, write_priority=WritePriority.HIGH)
    try:
        limits = http_limits(config.server)
        address_listener = (
            bind(*metrics_address, setting="--metrics-host/--metrics-port") if metrics_address else None
        )
        socket_listener = bind_unix(metrics_socket) if metrics_socket is not None else None
        async with (
            serving_metrics(registry, address_listener, limits=limits),
            serving_metrics(registry, socket_listener, limits=limits),
            UpstreamClient() as client,
        ):
            daemon = new_daemon(storage, client, routing, settings=config.daemon_settings(), registry=registry)

            def apply(newer: Config) -> None:
                newer = overlay(newer)
                routing.replace(newer)
                daemon.replace_settings(newer.daemon_settings())

            async with watching(config, apply), _woken_by(wake, daemon), _stopped_with(parent, daemon):
                await run_until_signalled(daemon)
    finally:
        await storage.close()


@contextlib.asynccontextmanager
async def _woken_by(wake: Connection | None, daemon: Daemon) -> AsyncIterator[None]:
    """While the block runs, a byte on `wake` (the API's pipe) wakes the daemon's claim."""
    if wake is None:
        yield
        return
    loop = asyncio.get_running_loop()
    descriptor = wake.fileno()
    os.set_blocking(descriptor, False)

    def woken() -> None:
        with contextlib.suppress(BlockingIOError):
            if not os.read(descriptor, 4096):  # the writer is gone: stop listening
                loop.remove_reader(descriptor)
        daemon.notify_work()

    loop.add_reader(descriptor, woken)
    try:
        yield
    finally:
        loop.remove_reader(descriptor)


@contextlib.asynccontextmanager
async def _stopped_with(parent: int | None, daemon: Daemon) -> AsyncIterator[None]:
    """While the block runs, the daemon stops if the process `parent` goes away."""
    if parent is None:
        yield
        return

    async def watch() -> None:
        await watch_parent(parent)
        logger.error("The serving process is gone; the daemon stops.")
        daemon.stop()

    task = asyncio.create_task(watch(), name="fusillade-parent")
    try:
        yield
    finally:
        task.cancel()


async def watch_parent(parent: int) -> None:
    """Return once the parent process is gone (where the kernel does not kill this process with it)."""
    while os.getppid() == parent:  # noqa: ASYNC110 (nothing signals a parent's death but the kernel's prctl)
        await asyncio.sleep(PARENT_POLL_INTERVAL)
