"""A replicated deployment as an operator runs it (docs/operations.md): `fusillade api` and several
`fusillade daemon` processes, each started from the same TOML configuration file, on one PostgreSQL database.

Each process is `python -m fusillade ...` with its stderr in a log file of the test's directory and no
`FUSILLADE_*` variable in its environment, so only the configuration file steers it. `Deployment.stop()` ends
every process still running (SIGTERM, then SIGKILL); `kill()` is the crash of one replica (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.support import polling

START_WITHIN = 30.0
"""Seconds a process gets to be ready (a cold interpreter imports the whole HTTP stack; 2 busy cores)."""
STOP_WITHIN = 15.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""
LOG_TAIL = 6000
"""Characters of each log shown by `Deployment.logs()`."""

_LISTENING = re.compile(r"Listening on (http://\S+) \(")
_DAEMON_STARTED = re.compile(r"Daemon ([0-9a-f-]{36}) started")


@dataclass
class Replica:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    """Its stderr."""
    daemon_id: str | None = None
    """For a daemon: its id in the `daemons` table, once it has registered."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_running(self) -> None:
        """AssertionError with the log when the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with {code}:\n{self.log_text()[-LOG_TAIL:]}")


def config_text(
    database_url: str, upstream_url: str, limits: Mapping[str, int], daemon: Mapping[str, str | int]
) -> str:
    """The configuration file shared by every process: the database, `[daemon]` knobs, one route per model."""
    lines = [f'database_url = "{database_url}"', "", "[daemon]"]
    lines += [
        f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"' for key, value in daemon.items()
    ]
    for model, limit in limits.items():
        lines += ["", f'[models."{model}"]', f'base_url = "{upstream_url}"', f"concurrency = {limit}"]
    return "\n".join(lines) + "\n"


class Deployment:
    """The processes of one test, sharing `config` (a TOML file in `directory`)."""

    def __init__(self, directory: Path, config: Path) -> None:
        self.directory = directory
        self.config = config
        self.replicas: list[Replica] = []

    async def start_api(self, name: str = "api") -> str:
        """`fusillade api --port 0`; its URL once `/readyz` answers 200."""
        replica = self._start(name, ["api", "--config", str(self.config), "--port", "0"])

        def listening() -> str | None:
            replica.check_running()
            found = _LISTENING.search(replica.log_text())
            return found.group(1) if found else None

        url = await polling.until(listening, within=START_WITHIN, interval=0.05, message=f"{name} to listen")
        assert url is not None
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                replica.check_running()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/readyz") as response:
                        return response.status == 200
                return False

            await polling.until(ready, within=START_WITHIN, interval=0.05, message=f"{name} /readyz to answer 200")
        return url

    def start_daemon(self, name: str) -> Replica:
        """`fusillade daemon`, started; `daemon_started` waits until it has registered."""
        return self._start(name, ["daemon", "--config", str(self.config)])

    async def daemon_started(self, replica: Replica) -> str:
        """Wait until the daemon has registered in the database (it logs its id); that id."""

        def started() -> str | None:
            replica.check_running()
            found = _DAEMON_STARTED.search(replica.log_text())
            return found.group(1) if found else None

        daemon_id = await polling.until(
            started, within=START_WITHIN, interval=0.05, message=f"{replica.name} to register"
        )
        assert daemon_id is not None
        replica.daemon_id = daemon_id
        return daemon_id

    def pause(self, replica: Replica) -> None:
        """SIGSTOP: the process is frozen (its sockets stay open) until `resume` or `kill`."""
        os.kill(replica.pid, signal.SIGSTOP)

    def resume(self, replica: Replica) -> None:
        os.kill(replica.pid, signal.SIGCONT)

    async def kill(self, replica: Replica) -> None:
        """SIGKILL, as the OOM killer or a lost machine ends it; returns once the process is gone."""
        os.kill(replica.pid, signal.SIGKILL)
        await asyncio.to_thread(replica.popen.wait)

    def logs(self) -> str:
        """The end of every process' log, each under its name."""
        return "\n".join(
            f"----- {replica.name} (exit code {replica.popen.poll()}) -----\n{replica.log_text()[-LOG_TAIL:]}"
            for replica in self.replicas
        )

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Attach `logs()` to any exception raised in the block (pytest shows it under the failure)."""
        try:
            yield
        except BaseException as error:
            error.add_note(self.logs())
            raise

    async def stop(self) -> dict[str, int]:
        """SIGTERM every process still running, SIGKILL those not gone within `STOP_WITHIN`; the exit codes."""
        for replica in self.replicas:
            if replica.popen.poll() is None:
                replica.popen.terminate()
        for replica in self.replicas:
            try:
                await asyncio.to_thread(replica.popen.wait, STOP_WITHIN)
            except subprocess.TimeoutExpired:
                replica.popen.kill()
                await asyncio.to_thread(replica.popen.wait)
        return {replica.name: replica.popen.returncode for replica in self.replicas}

    def _start(self, name: str, arguments: list[str]) -> Replica:
        log = self.directory / f"{name}.log"
        environment = {key: value for key, value in os.environ.items() if not key.startswith("FUSILLADE_")}
        with log.open("wb") as errors:
            popen = subprocess.Popen(
                [sys.executable, "-m", "fusillade", *arguments],
                cwd=self.directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        replica = Replica(name, popen, log)
        self.replicas.append(replica)
        return replica
