"""fusillade's own commands as subprocesses for end-to-end tests: `fusillade mock-upstream` and `fusillade serve`
started as a user starts them (`python -m fusillade ...`), each ready only once it answers, all stopped together.

Every process writes its stderr to a log file in the test's directory; `Processes.logs()` gathers them, so that a
failing test can show what the servers said. The children get the test's environment without `FUSILLADE_*`
variables (a module-scoped deployment starts before the per-test environment cleaning), so only their command
line and configuration file steer them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.support import polling

START_WITHIN = 30.0
"""Seconds a process gets to answer after it was started (a cold interpreter imports the whole HTTP stack)."""
STOP_WITHIN = 15.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""
LOG_TAIL = 8000
"""Characters of each log shown by `Processes.logs()`."""

_LISTENING = re.compile(r"Listening on (http://\S+) \(")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    """Its stderr."""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_running(self) -> None:
        """AssertionError with the log when the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with {code}:\n{self.log_text()[-LOG_TAIL:]}")

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL after `STOP_WITHIN` seconds; the exit code."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                await asyncio.to_thread(self.popen.wait, STOP_WITHIN)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait)
        return self.popen.returncode


class Processes:
    """The subprocesses of one test (or module), in `directory`; `stop()` ends every one of them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    async def mock_upstream(self, *flags: str, name: str = "mock-upstream") -> str:
        """`fusillade mock-upstream --port 0 FLAGS`; its URL once it listens (the first line of its stdout)."""
        stdout = self.directory / f"{name}.out"
        process = self._start(name, ["mock-upstream", "--port", "0", *flags], stdout=stdout)

        def url() -> str | None:
            process.check_running()
            first, newline, _ = stdout.read_text().partition("\n")
            return first.strip() if newline else None

        found = await polling.until(url, within=START_WITHIN, interval=0.05, message=f"{name} to print its URL")
        assert found is not None
        return found

    async def serve(self, *arguments: str, name: str = "serve") -> str:
        """`fusillade serve --port 0 ARGUMENTS`; its URL once `/readyz` answers 200 (the database is open)."""
        process = self._start(name, ["serve", "--port", "0", *arguments])

        def listening() -> str | None:
            process.check_running()
            found = _LISTENING.search(process.log_text())
            return found.group(1) if found else None

        url = await polling.until(listening, within=START_WITHIN, interval=0.05, message=f"{name} to listen")
        assert url is not None
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                process.check_running()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/readyz") as response:
                        return response.status == 200
                return False

            await polling.until(ready, within=START_WITHIN, interval=0.05, message=f"{name} /readyz to answer 200")
        return url

    def logs(self) -> str:
        """The end of every process' log, each under its name."""
        return "\n".join(
            f"----- {process.name} (exit code {process.popen.poll()}) -----\n{process.log_text()[-LOG_TAIL:]}"
            for process in self.started
        )

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Attach `logs()` to any exception raised in the block (shown by pytest under the failure)."""
        try:
            yield
        except BaseException as error:
            error.add_note(self.logs())
            raise

    async def stop(self) -> None:
        """Stop every process, the last started first (the server before its upstreams)."""
        for process in reversed(self.started):
            await process.stop()

    def _start(self, name: str, arguments: list[str], *, stdout: Path | None = None) -> Process:
        log = self.directory / f"{name}.log"
        environment = {key: value for key, value in os.environ.items() if not key.startswith("FUSILLADE_")}
        with log.open("wb") as errors, open(stdout or os.devnull, "wb") as output:
            popen = subprocess.Popen(
                [sys.executable, "-m", "fusillade", *arguments],
                cwd=self.directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=errors,
            )
        process = Process(name, popen, log)
        self.started.append(process)
        return process
