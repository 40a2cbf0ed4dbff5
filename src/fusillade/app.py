"""The composition root: the one place that builds fusillade's concrete parts from a `Config` and runs them.

```
 fusillade serve   ->  serve(config)                      HTTP API + daemon, one process, one event loop
 fusillade api     ->  serve(config, with_daemon=False)   HTTP API only (replicas share PostgreSQL)
 fusillade daemon  ->  run_daemon(config)                 daemon only
```

Start-up order: open (and migrate) the storage, resolve the routes (upstream keys read from the environment),
decide who may call the API, bind the socket, then start the daemon and the HTTP server. SIGTERM or SIGINT
stop in the reverse order: stop accepting HTTP connections (requests in flight get `HTTP_SHUTDOWN_GRACE`),
stop the daemon in order (its own grace, then unfinished claims are released), close the storage.

Without any API key (none in the database, no admin key configured) the API serves one owner, `local`, to
whoever connects, so it only listens on a loopback address; asked to listen elsewhere it refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, ProcessCollector

from fusillade import __version__, errors
from fusillade.api.app import create_app, create_metrics_app
from fusillade.api.context import ApiContext, MoreMetrics
from fusillade.api.server import HttpLimits, ServerConfig
from fusillade.config import DEFAULT_ROUTE_MODEL, Config, ConfigWatcher, RouteSection, ServerSection
from fusillade.daemon import Daemon, run_until_signalled
from fusillade.domain.served import ServedModels
from fusillade.metrics import DaemonMetrics
from fusillade.mock_upstream import Behaviour, MockUpstream
from fusillade.service import Service
from fusillade.storage import factory
from fusillade.storage.base import Storage, WritePriority
from fusillade.supervision import DaemonProcess, lower_api_priority, watch_parent
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route

logger = logging.getLogger(__name__)

LOCAL_OWNER = "local"
"""The owner of everything created through an API that has no keys, and by `fusillade run`."""
HTTP_SHUTDOWN_GRACE = 10
"""Seconds HTTP requests in flight (an upload, a download) get to finish when the server stops."""
MOCK_UPSTREAM_CONCURRENCY = 64
"""Limit of the route to the fake upstream of `fusillade serve --mock-upstream`."""

_NO_KEYS_ADVICE = "create a key with `fusillade keys create --owner NAME`"
_LISTEN_SETTING = "--host/--port ([server] host and port in the configuration)"


# -------------------------------------------------------------------------------------------- routing


class Routing:
    """The routing table in force in a process: the configuration's routes with their keys read, and the
    default route for models without one of their own (the daemon learns those models from the queue)."""

    def __init__(self, config: Config) -> None:
        self.on_change: Callable[[Mapping[str, Route], Route | None], None] | None = None
        """Called with the new table and default route whenever they change (the daemon's `replace_routes`)."""
        self._routes, self._default = _resolve(config)

    @property
    def routes(self) -> dict[str, Route]:
        """The models with a route of their own."""
        return dict(self._routes)

    @property
    def default(self) -> Route | None:
        return self._default

    def accepts(self, model: str) -> bool:
        """Whether requests for `model` can be sent somewhere (an upload checks this for every line)."""
        return model in self._routes or self._default is not None

    def replace(self, config: Config) -> None:
        """Use a new configuration (a reload); raises `InvalidConfiguration` (and keeps the old one) when a
        route's key variable is not set."""
        self._routes, self._default = _resolve(config)
        if self.on_change is not None:
            self.on_change(self.routes, self._default)


def served_models(config: Config, *, previous: ServedModels | None = None) -> ServedModels:
    """The models `config` serves (reads no secret): each model with a route of its own, since now or since
    `previous` had it, and whether a default route takes the others. `served_models(config).describe()` is
    `served models: a, b, c (and 4 more)`, the list a no-route message gives."""
    names = [name for name in config.models if name != DEFAULT_ROUTE_MODEL]
    # No model is called "" (model names are not empty): only the default route routes it.
    return ServedModels.of(names, default_route=config.has_route(""), now=datetime.now(UTC), previous=previous)


def _resolve(config: Config) -> tuple[dict[str, Route], Route | None]:
    """The listed models' routes and the default route (or None), keys read from the environment."""
    # No model is called "" (model names are not empty), so route_for("") is the default route, or None.
    return config.resolve_routes(), config.route_for("")


def with_mock_upstream(config: Config, *, url: str) -> Config:
    """`config` with every model that has no route of its own sent to the fake upstream at `url`."""
    route = RouteSection(base_url=url, concurrency=MOCK_UPSTREAM_CONCURRENCY)
    return config.model_copy(update={"default_route": route})


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


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling (`serve` stops the server itself, in order), and with an
    event set once it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


def bind(host: str, port: int, *, setting: str = _LISTEN_SETTING) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: a free one); `ConfigurationError` saying what to change
    (`setting`) when the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise errors.ConfigurationError(
            f"Cannot listen on {host}:{port} ({exc.strerror or exc}); choose another address or port with "
            f"{setting}."
        ) from None


def http_limits(section: ServerSection) -> HttpLimits:
    """What one client may make an HTTP server of this process hold (`[server]`)."""
    return HttpLimits(
        max_header_bytes=section.max_header_bytes,
        max_headers=section.max_headers,
        header_timeout=section.header_timeout.total_seconds(),
        max_connections=section.max_connections,
    )


def url_of(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def new_registry(process_namespace: str = "") -> CollectorRegistry:
    """A metrics registry with the process' own metrics (memory, CPU, open files), named `process_*`, or
    `NAMESPACE_process_*` (the daemon process of `serve`, whose metrics the API shows beside its own)."""
    registry = CollectorRegistry()
    ProcessCollector(namespace=process_namespace, registry=registry)
    return registry


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
        overlay = _no_overlay
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
        storage = await factory.open_storage(
            config.database_url, database_timeout=config.database_timeout, write_priority=WritePriority.LOW
        )
        stack.push_async_callback(storage.close)
        registry = new_registry()
        service = Service(
            storage,
            limits=config.upload_limits(),
            served_models=live.served,
            spool_directory=config.uploads.spool_directory,
            notify_work=daemon.notify_work if daemon is not None else _nothing,
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
        server = _Server(ServerConfig(create_app(context), limits=limits, graceful_shutdown=HTTP_SHUTDOWN_GRACE))
        metrics_address = config.server.metrics_listen()
        metrics_listener = bind(*metrics_address, setting="[server] metrics_address") if metrics_address else None
        await stack.enter_async_context(
            serving_metrics(registry, metrics_listener, limits=limits, more=more_metrics)
        )

        def apply(newer: Config) -> None:
            live.replace(overlay(newer))
            service.replace_limits(newer.upload_limits())
            if daemon is not None:
                daemon.reload()

        await stack.enter_async_context(_watching(config, apply))
        await _run_until_stopped(server, listener, daemon, on_listening)


def _new_daemon(
    storage: Storage, client: UpstreamClient, config: Config, routing: Routing, registry: CollectorRegistry
) -> Daemon:
    daemon = Daemon(
        storage,
        client,
        routing.routes,
        default_route=routing.default,
        settings=config.daemon_settings(),
        metrics=DaemonMetrics(registry),
        version=__version__,
    )
    routing.on_change = daemon.replace_routes
    return daemon


def _no_overlay(config: Config) -> Config:
    return config


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
    server: _Server,
    listener: socket.socket,
    daemon: DaemonProcess | None,
    on_listening: Callable[[str], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with _signals_set(loop, stop.set):
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
            server_failure = await _outcome(server_task)
            daemon_failure = None
            if daemon is not None and daemon_task is not None:
                daemon.stop()
                daemon_failure = await _outcome(daemon_task)
    for failure in (daemon_failure, server_failure):
        if failure is not None:
            raise failure
    if server_task in done and stop_task not in done:
        raise RuntimeError("The HTTP server stopped on its own.")


async def _announce(
    server: _Server,
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


async def _outcome(task: asyncio.Task[None]) -> BaseException | None:
    """Wait for `task`; its exception, if it raised one (a cancelled task is not a failure)."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.exception()


@contextlib.contextmanager
def _signals_set(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> Iterator[None]:
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, handler)
    try:
        yield
    finally:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)


@contextlib.asynccontextmanager
async def _watching(config: Config, apply: Callable[[Config], None]) -> AsyncIterator[None]:
    """Reload the configuration file on change and on SIGHUP (when there is a file)."""
    if config.source is None:
        yield
        return
    async with ConfigWatcher(config.source, config, apply) as watcher:
        with contextlib.suppress(RuntimeError):  # no SIGHUP on this platform: the file is still watched
            watcher.handle_sighup()
        yield


# ----------------------------------------------------------------------------------------------- daemon


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
    overlay = functools.partial(with_mock_upstream, url=overlay_url) if overlay_url else _no_overlay
    config = overlay(config)
    routing = Routing(config)
    registry = new_registry(process_namespace)
    storage = await factory.open_storage(
        config.database_url, database_timeout=config.database_timeout, write_priority=WritePriority.HIGH
    )
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
            daemon = _new_daemon(storage, client, config, routing, registry)

            def apply(newer: Config) -> None:
                newer = overlay(newer)
                routing.replace(newer)
                daemon.replace_settings(newer.daemon_settings())

            async with _watching(config, apply), _woken_by(wake, daemon), _stopped_with(parent, daemon):
                await run_until_signalled(daemon)
    finally:
        await storage.close()


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at `path` (a stale one left by a killed process is replaced)."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(16)
    except BaseException:
        listener.close()
        raise
    return listener


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


@contextlib.asynccontextmanager
async def serving_metrics(
    registry: CollectorRegistry,
    listener: socket.socket | None,
    *,
    limits: HttpLimits,
    more: MoreMetrics | None = None,
) -> AsyncIterator[None]:
    """Serve `registry` (then `more`) at `/metrics` on `listener`, without a key, while the block runs (nothing
    when `listener` is None)."""
    if listener is None:
        yield
        return
    server = _Server(ServerConfig(create_metrics_app(registry, more), limits=limits))
    task = asyncio.create_task(server.serve(sockets=[listener]), name="fusillade-metrics")
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    try:
        if not server.ready.is_set():
            raise (await _outcome(task)) or RuntimeError("The metrics server stopped on its own.")
        if listener.family != socket.AF_UNIX:
            logger.info("Metrics on %s/metrics.", url_of(listener))
        yield
    finally:
        server.should_exit = True
        await _outcome(task)
