"""Live reloading of the configuration file, on SIGHUP and when the file changes.

What applies live is up to the callback; the configuration is designed so that the routing table (upstreams,
keys, concurrency limits), the upload limits and the daemon knobs can change while running. The keys of
`schema.RESTART_KEYS` (database URL, listen address, auth) are read once at start: a change is logged as a
warning and applies after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from fusillade import errors
from fusillade.config.loading import load_config
from fusillade.config.schema import Config

logger = logging.getLogger(__name__)

OnChange = Callable[[Config], Awaitable[None] | None]


class ConfigWatcher:
    """Watches the configuration file at `path` and hands every new valid configuration to `on_change`.

    The file is read again when its size, modification time or identity changes (editors that save by
    renaming), checked every `poll_interval` seconds, and at once on SIGHUP after `handle_sighup()`, or when
    `reload()` is called. A file that no longer loads is logged as an error and the current configuration
    stays in force; so does a configuration that `on_change` refuses by raising `ConfigurationError` (for
    instance when a route's key variable is not set). A reload that changes nothing calls nothing.

    Use it as an async context manager (or `start()` / `stop()`) inside a running event loop; `current` is the
    configuration in force, as loaded at start.
    """

    def __init__(
        self,
        path: Path,
        current: Config,
        on_change: OnChange,
        *,
        environ: Mapping[str, str] | None = None,
        poll_interval: float = 2.0,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval}.")
        self._path = path
        self._initial = current
        self._config = current
        self._on_change = on_change
        self._environ = environ
        self._poll_interval = poll_interval
        self._seen = self._signature()
        self._reload_requested = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._signal_loop: asyncio.AbstractEventLoop | None = None

    @property
    def config(self) -> Config:
        """The configuration in force: the last one `on_change` accepted."""
        return self._config

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()

    def start(self) -> None:
        """Start polling (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="config-watcher")

    def handle_sighup(self) -> None:
        """Reload on SIGHUP, until `stop()`. Only the main thread's running loop can receive signals; raises
        `RuntimeError` on a platform without SIGHUP, and (from asyncio) when called elsewhere."""
        if not hasattr(signal, "SIGHUP"):
            raise RuntimeError("This platform has no SIGHUP; the file is still watched for changes.")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._signal_loop = loop

    def request_reload(self) -> None:
        """Ask for a reload as soon as the watcher gets to it (what SIGHUP does)."""
        self._reload_requested.set()

    async def stop(self) -> None:
        """Stop polling and stop handling SIGHUP."""
        if self._signal_loop is not None:
            self._signal_loop.remove_signal_handler(signal.SIGHUP)
            self._signal_loop = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reload(self) -> bool:
        """Read the file now; True if a new configuration was accepted by `on_change` and is now in force."""
        async with self._lock:
            self._seen = self._signature()
            try:
                newer = load_config(self._path, environ=self._environ)
            except errors.ConfigurationError as exc:
                logger.error("Not reloading %s; the current configuration stays in force. %s", self._path, exc)
                return False
            if newer == self._config:
                return False
            for key in self._initial.restart_required(newer):
                logger.warning("%s changed in %s; it takes effect only after a restart.", key, self._path)
            try:
                applied = self._on_change(newer)
                if applied is not None:
                    await applied
            except errors.ConfigurationError as exc:
                logger.error("Not applying %s; the current configuration stays in force. %s", self._path, exc)
                return False
            except Exception:
                logger.exception("Applying %s failed; the current configuration stays in force.", self._path)
                return False
            self._config = newer
            logger.info("Reloaded the configuration from %s.", self._path)
            return True

    async def _watch(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._poll_interval):
                    await self._reload_requested.wait()
            except TimeoutError:
                if self._signature() == self._seen:
                    continue
            self._reload_requested.clear()
            await self.reload()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self._path)
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size, status.st_ino


@contextlib.asynccontextmanager
async def watching(config: Config, on_change: OnChange) -> AsyncIterator[None]:
    """While the block runs, reload `config`'s file when it changes and on SIGHUP (where there is SIGHUP),
    handing every new configuration to `on_change`; nothing to watch for a configuration without a file."""
    if config.source is None:
        yield
        return
    async with ConfigWatcher(config.source, config, on_change) as watcher:
        with contextlib.suppress(RuntimeError):  # no SIGHUP on this platform: the file is still watched
            watcher.handle_sighup()
        yield
