"""`fusillade serve`'s daemon, in a child process that the serving process supervises.

```
 fusillade serve  (this process: the HTTP API, the supervisor)
   └── daemon process  (spawned; `daemon_process.run_daemon`, restarted if it crashes)
         ◄── wake pipe: an upload or a new batch in the API wakes the daemon's claim at once
         ──► /metrics over a Unix socket: the API's /metrics shows the daemon's too
```

Why two processes: the API's work (parsing uploads, rendering result files) and the daemon's (thousands of
requests a second) each get an interpreter and a core of their own, instead of taking turns on one event loop;
a crash of one is not a crash of the other.

The rules, as a user sees them: one command, one Ctrl-C, one exit code.
- Ctrl-C or SIGTERM: the API stops taking connections, then the daemon gets SIGTERM and stops in order (its
  calls in flight get `daemon.shutdown_grace`); SIGHUP reaches both.
- The daemon process exits on its own: it is started again after a pause (1 s, doubling up to 30 s). Three
  failures in a row within `QUICK_FAILURE` of their start, or a configuration error (exit code 2), stop
  `serve` as a whole: it never runs half alive.
- `serve` killed outright (SIGKILL, a crash): the kernel kills the daemon process with it (Linux; elsewhere
  the daemon notices within a second that its parent is gone and stops at once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Final

import aiohttp

from fusillade import errors, runtime
from fusillade.composition.daemon_process import run_daemon
from fusillade.config import Config

logger = logging.getLogger(__name__)

QUICK_FAILURE: Final = 10.0
"""Seconds: a daemon process that exits sooner than this after its start failed to start."""
MAX_QUICK_FAILURES: Final = 3
RESTART_DELAYS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Pauses before each restart in a row (the last one repeats)."""
STABLE_AFTER: Final = 60.0
"""Seconds: a daemon process that ran this long before it died starts the pauses from the first again."""
STOP_EXTRA: Final = 10.0
"""Seconds the daemon process gets beyond `daemon.shutdown_grace` to exit after SIGTERM, before SIGKILL."""
METRICS_TIMEOUT: Final = 2.0
"""Seconds the API's /metrics waits for the daemon process's metrics."""
METRICS_SOCKET: Final = "daemon-metrics.sock"
PROCESS_NAMESPACE: Final = "fusillade_daemon"
"""Prefix of the daemon process's own metrics (CPU, memory), beside the API process's `process_*`."""
EXIT_INVALID: Final = 2

_PR_SET_PDEATHSIG: Final = 1


class DaemonProcess:
    """The daemon of `serve`, run in a child process: `run()` until `stop()`, restarting it when it fails.
    `notify_work()` and `metrics()` are the API's links to it."""

    def __init__(self, config: Config, *, overlay_url: str | None, log_level: int) -> None:
        self._config = config
        self._overlay_url = overlay_url
        self._log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._wake_reader, self._wake_writer = self._context.Pipe(duplex=False)
        os.set_blocking(self._wake_writer.fileno(), False)
        self._directory = Path(tempfile.mkdtemp(prefix="fusillade-serve-"))  # 0700: only this user reaches it
        self._stop = asyncio.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        # Daemon processes are started from this thread, made now: a child takes the CPU priority of the thread
        # that starts it (Linux), and the API's threads may be given a lower one (`lower_api_priority`).
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusillade-spawn")
        self._spawner.submit(lambda: None).result()

    @property
    def metrics_socket(self) -> Path:
        return self._directory / METRICS_SOCKET

    def notify_work(self) -> None:
        """Wake the daemon's claim (never blocks: a full pipe already holds a wake-up)."""
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._wake_writer.fileno(), b"w")

    def reload(self) -> None:
        """Pass a configuration reload on (SIGHUP to the daemon process)."""
        process = self._process
        if process is not None and process.pid is not None and process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGHUP)

    def stop(self) -> None:
        self._stop.set()

    async def metrics(self) -> bytes:
        """The daemon process's metrics in Prometheus text format; empty while it does not answer."""
        timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT)
        try:
            connector = aiohttp.UnixConnector(path=str(self.metrics_socket))
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get("http://daemon/metrics") as response,
            ):
                return await response.read() if response.status == 200 else b""
        except (aiohttp.ClientError, TimeoutError, OSError):
            return b""

    async def run(self) -> None:
        """Start the daemon process and keep it running until `stop()`; then stop it in order. Raises
        `ConfigurationError` or `FusilladeError` when it cannot be kept running."""
        crashes = 0  # in a row: each pause doubles until a process runs for `STABLE_AFTER`
        failed_starts = 0  # in a row: exits within `QUICK_FAILURE` of the start
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                exit_code = await self._run_once()
                if self._stop.is_set():
                    return
                if exit_code == EXIT_INVALID:
                    raise errors.ConfigurationError(
                        "The daemon process could not start (its log says why); serve stops."
                    )
                ran = time.monotonic() - started
                crashes = crashes + 1 if ran < STABLE_AFTER else 1
                failed_starts = failed_starts + 1 if ran < QUICK_FAILURE else 0
                if failed_starts >= MAX_QUICK_FAILURES:
                    raise errors.FusilladeError(
                        f"The daemon process failed {failed_starts} times in a row (last exit code {exit_code}); "
                        "serve stops rather than run without it. Its log says why."
                    )
                delay = RESTART_DELAYS[min(crashes, len(RESTART_DELAYS)) - 1]
                logger.error(
                    "The daemon process exited with code %s; starting it again in %.0f s.", exit_code, delay
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
        finally:
            self._wake_reader.close()
            self._wake_writer.close()
            self._spawner.shutdown(wait=False)
            shutil.rmtree(self._directory, ignore_errors=True)

    async def _run_once(self) -> int:
        process = self._context.Process(
            target=daemon_process_main,
            args=(
                self._config,
                self._overlay_url,
                self._wake_reader,
                str(self.metrics_socket),
                self._log_level,
                os.getpid(),
            ),
            name="fusillade-daemon",
        )
        await asyncio.get_running_loop().run_in_executor(self._spawner, process.start)
        self._process = process
        logger.info("Daemon process %s started.", process.pid)
        exited = asyncio.create_task(_exit_of(process))
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._stop_process(process, exited)
            return await exited
        finally:
            stop.cancel()
            if not exited.done():  # cancelled: do not leave the daemon process behind
                process.kill()
                exited.cancel()

    async def _stop_process(self, process: multiprocessing.process.BaseProcess, exited: asyncio.Task[int]) -> None:
        assert process.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        within = self._config.daemon.shutdown_grace.total_seconds() + STOP_EXTRA
        done, _ = await asyncio.wait({exited}, timeout=within)
        if not done:
            logger.error("The daemon process did not stop within %.0f s; killing it.", within)
            process.kill()


def lower_api_priority(niceness: int) -> None:
    """Give the calling thread, and the threads and processes it starts from now on, a CPU priority `niceness`
    lower (Linux, where the priority is per thread: the daemon processes, started from `DaemonProcess`'s own
    thread, keep theirs). Elsewhere the whole process would be lowered, its children with it: nothing is done."""
    if niceness > 0 and sys.platform.startswith("linux"):
        os.nice(niceness)


async def _exit_of(process: multiprocessing.process.BaseProcess) -> int:
    """Wait (without a thread) until `process` exits; its exit code (-N: killed by signal N)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    sentinel = process.sentinel

    def exited() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(sentinel, exited)
    try:
        await ended
    finally:
        loop.remove_reader(sentinel)
    process.join()
    assert process.exitcode is not None
    return process.exitcode


# ------------------------------------------------------------------------------------- in the child


def daemon_process_main(
    config: Config, overlay_url: str | None, wake: Connection, metrics_socket: str, log_level: int, parent: int
) -> None:
    """The daemon process: `run_daemon` with the API's wake pipe and a metrics socket; exit code 2 for a
    configuration error, 1 for any other failure."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches serve, which stops this process in order
    logging.basicConfig(level=log_level, format=runtime.LOG_FORMAT, stream=sys.stderr)
    try:
        runtime.run(
            run_daemon(
                config,
                overlay_url=overlay_url,
                wake=wake,
                metrics_socket=Path(metrics_socket),
                process_namespace=PROCESS_NAMESPACE,
                parent=parent,
            )
        )
    except errors.ConfigurationError as exc:
        logger.error("%s", exc)
        sys.exit(EXIT_INVALID)
    except errors.FusilladeError as exc:
        logger.error("%s", exc)
        sys.exit(1)


def _die_with_parent(parent: int) -> None:
    """Be killed with the parent (Linux: PR_SET_PDEATHSIG); exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
