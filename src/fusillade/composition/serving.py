"""The HTTP API's process: `fusillade serve` (with a daemon in a child process it supervises) and
`fusillade api` (the API alone; replicas share PostgreSQL).

```
 fusillade serve   ->  serve(config)                      HTTP API here, the daemon in its own process
 fusillade api     ->  serve(config, with_daemon=False)   HTTP API only
```

Start-up order: open (and migrate) the storage, resolve the routes (upstream keys read from the environment),
decide who may call the API, bind the socket, then start the daemon process and the HTTP server. SIGTERM or
SIGINT stop in the reverse order: stop accepting HTTP connections (requests in flight get
`HTTP_SHUTDOWN_GRACE`), stop the daemon process in order (its own grace, then unfinished claims are released),
close the storage.

Without any API key (none in the database, no admin key configured) the API serves one owner, `local`, to
whoever connects, so it only listens on a loopback address; asked to listen elsewhere it refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable

from fusillade import errors, runtime
from fusillade.api.app import create_app
from fusillade.api.context import ApiContext
from fusillade.api.server import ServerConfig
from fusillade.composition import LOCAL_OWNER
from fusillade.composition.database import open_storage
from fusillade.composition.http import (
    HttpServer,
    bind,
    http_limits,
    new_registry,
    outcome,
    serving_metrics,
    url_of,
)
from fusillade.composition.routing import Routing, no_overlay, served_models, with_mock_upstream
from fusillade.composition.supervision import DaemonProcess, lower_api_priority
from fusillade.config import Config, watching
from fusillade.domain.served import ServedModels
from fusillade.mock_upstream import Behaviour, MockUpstream
from fusillade.service import Service
from fusillade.storage.base import Storage, WritePriority

logger = logging.getLogger(__name__)

HTTP_SHUTDOWN_GRACE = 10
"""Seconds HTTP requests in flight (an upload, a download) get to finish when the server stops."""

_NO_KEYS_ADVICE = "create a key with `fusillade keys create --owner NAME`"


# ------------------------------------------------------------------------------------------------- auth


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only reaches this machine: every address it resolves to is a
    loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(entry[4][0])).is_loopback for entry in found)


async def open_owner_for(storage: Storage, *, admin_key: str | None, host: str) -> str | None:
    """Who the API serves without a bearer key: `LOCAL_OWNER` when no key exists (none active in the
    database, no admin key configured), else None (every request needs a key). Without keys the API may only
    listen on loopback: raises `ConfigurationError` for any other `host`."""
    if admin_key is not None:
        return None
    if any(key.revoked_at is None for key in await storage.list_api_keys()):
        return None
    if not is_loopback(host):
        raise errors.ConfigurationError(
            f"Refusing to listen on {host}: no API key exists, and without keys anyone who can connect could "
            f"use the API. Either {_NO_KEYS_ADVICE} (the key then goes in your clients' Authorization header) "
            "and start again, or listen on this machine only with --host 127.0.0.1 ([server] host)."
        )
    logger.warning("No API keys: serving one local owner (%r) on %s only; %s.", LOCAL_OWNER, host, _NO_KEYS_ADVICE)
    return LOCAL_OWNER


# ---------------------------------------------------------------------------------------------- serving


async def serve(
    config: Config,
    *,
    with_daemon: bool = True,
    mock_upstream: bool = False,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run the HTTP API (and, `with_daemon`, a daemon in a child process it supervises: `supervision`) until
    SIGTERM or SIGINT.

    `mock_upstream`: also run the fake upstream here and send every model without a route of its own to it
    (demos). `on_listening` gets the API's base URL once it accepts connections. Raises
    `ConfigurationError` when the configuration cannot work (a key variable unset, an address in use, a
    public address without API keys); raises the daemon process's failure after stopping the rest.
    """
    async with contextlib.AsyncExitStack() as stack:
        overlay = no_overlay
        overlay_url = None
        if mock_upstream:
            fake = await stack.enter_async_context(MockUpstream(Behaviour()))
            overlay_url = fake.url
            overlay = functools.partial(with_mock_upstream, url=fake.url)
            config = overlay(config)
            logger.warning("Demo mode: models without a route of their own go to the fake upstream %s.", fake.url)
        live = _LiveServed(config)
        daemon = None
        if with_daemon:
            Routing(config)  # a route whose key variable is unset stops here, before anything starts
            daemon = DaemonProcess(
                config, overlay_url=overlay_url, log_level=logging.getLogger().getEffectiveLevel()
            )
            lower_api_priority(config.server.api_niceness)  # before the API's threads start: they inherit it
        # The API's writes (uploads, batch creation) wait for the daemons' on a shared SQLite file.
        storage = await open_storage(config, write_priority=WritePriority.LOW)
        stack.push_async_callback(storage.close)
        registry = new_registry()
        service = Service(
            storage,
            limits=config.upload_limits(),
            served_models=live.served,
            spool_directory=config.uploads.spool_directory,
            notify_work=daemon.notify_work if daemon is not None else _nothing,
            prices=config.prices(),
        )
        admin_key = config.admin_key()
        more_metrics = daemon.metrics if daemon is not None else None
        context = ApiContext(
            storage=storage,
            service=service,
            registry=registry,
            admin_key=admin_key,
            open_owner=await open_owner_for(storage, admin_key=admin_key, host=config.server.host),
            metrics_key=config.metrics_key(),
            more_metrics=more_metrics,
        )
        listener = bind(config.server.host, config.server.port)
        limits = http_limits(config.server)
        server = HttpServer(
            ServerConfig(create_app(context), limits=limits, graceful_shutdown=HTTP_SHUTDOWN_GRACE)
        )
        metrics_address = config.server.metrics_listen()
        metrics_listener = bind(*metrics_address, setting="[server] metrics_address") if metrics_address else None
        await stack.enter_async_context(
            serving_metrics(registry, metrics_listener, limits=limits, more=more_metrics)
        )

        def apply(newer: Config) -> None:
            live.replace(overlay(newer))
            service.replace_limits(newer.upload_limits())
            service.replace_prices(newer.prices())
            if daemon is not None:
                daemon.reload()

        await stack.enter_async_context(watching(config, apply))
        await _run_until_stopped(server, listener, daemon, on_listening)


class _LiveServed:
    """The models the API serves, as the configuration in force says (a reload replaces them)."""

    def __init__(self, config: Config) -> None:
        self._served = served_models(config)

    def replace(self, config: Config) -> None:
        self._served = served_models(config, previous=self._served)

    def served(self) -> ServedModels:
        return self._served


def _nothing() -> None:
    """Nothing to wake: no daemon runs in this process."""


async def _run_until_stopped(
    server: HttpServer,
    listener: socket.socket,
    daemon: DaemonProcess | None,
    on_listening: Callable[[str], None] | None,
) -> None:
    stop = asyncio.Event()
    with runtime.stop_signals_handled(stop.set):
        server_task = asyncio.create_task(server.serve(sockets=[listener]), name="fusillade-http")
        daemon_task = asyncio.create_task(daemon.run(), name="fusillade-daemon") if daemon else None
        stop_task = asyncio.create_task(stop.wait(), name="fusillade-stop")
        watched = {server_task, stop_task} | ({daemon_task} if daemon_task else set())
        try:
            await _announce(server, server_task, url_of(listener), daemon is not None, on_listening)
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
            logger.info("Stopping: no new HTTP connections.")
            server.should_exit = True
            server_failure = await outcome(server_task)
            daemon_failure = None
            if daemon is not None and daemon_task is not None:
                daemon.stop()
                daemon_failure = await outcome(daemon_task)
    for failure in (daemon_failure, server_failure):
        if failure is not None:
            raise failure
    if server_task in done and stop_task not in done:
        raise RuntimeError("The HTTP server stopped on its own.")


async def _announce(
    server: HttpServer,
    server_task: asyncio.Task[None],
    url: str,
    with_daemon: bool,
    on_listening: Callable[[str], None] | None,
) -> None:
    """Wait until the HTTP server has started (or failed to), then say where it listens."""
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait({ready, server_task}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if server.ready.is_set():
        logger.info("Listening on %s (%s).", url, "API; daemon in its own process" if with_daemon else "API only")
        if on_listening is not None:
            on_listening(url)
