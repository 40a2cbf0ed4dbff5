"""The HTTP servers of a process (the API's, the metrics'): their sockets, their limits, and uvicorn run the
way the composition root stops it (in order, by itself, never on uvicorn's own signal handling)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, ProcessCollector

from fusillade import errors
from fusillade.api.app import create_metrics_app
from fusillade.api.context import MoreMetrics
from fusillade.api.server import HttpLimits, ServerConfig
from fusillade.config import ServerSection

logger = logging.getLogger(__name__)

LISTEN_SETTING = "--host/--port ([server] host and port in the configuration)"


class HttpServer(uvicorn.Server):
    """uvicorn's server without its signal handling (the composition root stops the server itself, in order),
    and with an event set once it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


def bind(host: str, port: int, *, setting: str = LISTEN_SETTING) -> socket.socket:
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


async def outcome(task: asyncio.Task[None]) -> BaseException | None:
    """Wait for `task`; its exception, if it raised one (a cancelled task is not a failure)."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.exception()


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
    server = HttpServer(ServerConfig(create_metrics_app(registry, more), limits=limits))
    task = asyncio.create_task(server.serve(sockets=[listener]), name="fusillade-metrics")
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    try:
        if not server.ready.is_set():
            raise (await outcome(task)) or RuntimeError("The metrics server stopped on its own.")
        if listener.family != socket.AF_UNIX:
            logger.info("Metrics on %s/metrics.", url_of(listener))
        yield
    finally:
        server.should_exit = True
        await outcome(task)
