"""fusillade's own commands as subprocesses, started as an operator or a user starts them: `python -m fusillade
COMMAND ...` in the test's directory, stdin closed, stdout in `NAME.out` and stderr (its log) in `NAME.log` there.

- `start()` starts one; the `Process` waits until it listens, is ready or has registered, signals it (SIGSTOP,
  SIGCONT, SIGKILL), stops it (SIGTERM, then SIGKILL) and shows what it wrote, for failure messages.
- `Processes` are those of one test (or module): it starts them (`serve`/`api`, `mock-upstream`, any command),
  runs one-shot commands, shows every log and stops every process still running. `async with Processes(...)`
  attaches the logs to any failure in the block and stops them all at its end, so that none outlives the test.

The children get the test's environment without `FUSILLADE_*` variables (a module-scoped deployment starts before
the per-test environment cleaning) plus what the test adds, so only their command line, their configuration file
and those additions steer them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from tests.support import polling

START_WITHIN = 30.0
"""Seconds a process gets to listen, be ready or register (a cold interpreter imports the whole HTTP stack, on
two busy cores)."""
STOP_WITHIN = 15.0
"""Seconds a process gets to exit after SIGTERM before it is killed, unless its `Processes` say otherwise."""
CLI_WITHIN = 60.0
"""Seconds a one-shot command gets to finish before it is killed."""
LOG_TAIL = 8000
"""Characters of a process' output shown in a failure message."""

LISTENING = re.compile(r"Listening on (http://\S+) \(")
"""The line `serve` and `api` log once they accept connections."""
DAEMON_STARTED = re.compile(r"Daemon ([0-9a-f-]{36}) started")
"""The line a daemon logs once it has registered in the database."""

ReadyCheck = Callable[[str], Awaitable[bool]]
"""Whether the `/readyz` URL given answers 200 now."""


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without `FUSILLADE_*` variables, plus `extra`."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("FUSILLADE_")}
    return {**inherited, **(extra or {})}


@dataclass
class Process:
    """One `python -m fusillade ...` started by `start()`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    """Its stderr, where fusillade logs."""
    stdout: Path
    stop_within: float = STOP_WITHIN
    """Seconds `stop()` gives it after SIGTERM."""
    daemon_id: str | None = None
    """For a daemon: its id in the `daemons` table, once `registered()` has seen it."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def output(self) -> str:
        """Everything it wrote, stdout then stderr."""
        return "".join(path.read_text(errors="replace") for path in (self.stdout, self.log) if path.exists())

    def report(self) -> str:
        """The end of its output under its name and exit code (None while it runs), for a failure message."""
        return f"----- {self.name} (exit code {self.popen.poll()}) -----\n{self.output()[-LOG_TAIL:]}"

    def check_running(self) -> None:
        """AssertionError with the end of its output when the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with {code}:\n{self.output()[-LOG_TAIL:]}")

    async def logged(
        self, pattern: re.Pattern[str], *, message: str, within: float = START_WITHIN
    ) -> re.Match[str]:
        """Wait until its log matches `pattern` (`message` names what is awaited); the match. Fails at once when
        the process exits."""

        def found() -> re.Match[str] | None:
            self.check_running()
            return pattern.search(self.log_text())

        match = await polling.until(found, within=within, interval=0.05, message=message)
        assert match is not None
        return match

    async def listening(self, *, within: float = START_WITHIN) -> str:
        """Wait until `serve` or `api` logs `Listening on URL`; that URL."""
        return (await self.logged(LISTENING, message=f"{self.name} to listen", within=within)).group(1)

    async def ready(self, *, within: float = START_WITHIN, check: ReadyCheck | None = None) -> str:
        """`listening()`, then wait until its `/readyz` answers 200 (the database is open); its URL. By default
        a plain GET, where a connection error counts as not ready yet; `check` replaces it (a stricter probe)."""
        url = await self.listening(within=within)
        async with aiohttp.ClientSession() as http:

            async def answers_200(readyz: str) -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(readyz) as response:
                        return response.status == 200
                return False

            async def ready() -> bool:
                self.check_running()
                return await (check or answers_200)(f"{url}/readyz")

            await polling.until(ready, within=within, interval=0.05, message=f"{self.name} /readyz to answer 200")
        return url

    async def registered(self, *, within: float = START_WITHIN) -> str:
        """Wait until the daemon has registered in the database (it logs its id); that id, also in `daemon_id`."""
        found = await self.logged(DAEMON_STARTED, message=f"{self.name} to register", within=within)
        self.daemon_id = found.group(1)
        return self.daemon_id

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (its sockets stay open) until `resume()` or `kill()`."""
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: a paused process runs on."""
        self.popen.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost machine ends it; returns once the process is gone (its files and
        sockets closed by the kernel). AssertionError with its output if it had exited already."""
        self.check_running()
        self.popen.kill()
        await asyncio.to_thread(self.popen.wait)

    async def stop(self, within: float | None = None) -> int:
        """SIGTERM, then SIGKILL if it is still running after `within` seconds (default `stop_within`); the exit
        code. Nothing is sent to a process that has exited already."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                await asyncio.to_thread(self.popen.wait, self.stop_within if within is None else within)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait)
        return self.popen.returncode


def start(
    directory: Path,
    name: str,
    arguments: Sequence[str],
    *,
    environment: Mapping[str, str],
    stop_within: float = STOP_WITHIN,
) -> Process:
    """`python -m fusillade ARGUMENTS` in `directory` with exactly `environment` (see `child_environment`), its
    stdout in `NAME.out` and its stderr in `NAME.log` there, stdin closed."""
    log, stdout = directory / f"{name}.log", directory / f"{name}.out"
    with log.open("wb") as errors, stdout.open("wb") as output:
        popen = subprocess.Popen(
            [sys.executable, "-m", "fusillade", *arguments],
            cwd=directory,
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=errors,
        )
    return Process(name, popen, log, stdout, stop_within)


class Processes:
    """The fusillade processes of one test (or module), in `directory`, with the test's environment minus
    `FUSILLADE_*` plus `environment`. `stop()` ends every one still running: the last started first (a server
    before the upstreams it calls), or, with `stop_together`, all at once (peers such as replicas)."""

    def __init__(
        self,
        directory: Path,
        *,
        environment: Mapping[str, str] | None = None,
        stop_within: float = STOP_WITHIN,
        stop_together: bool = False,
    ) -> None:
        self.directory = directory
        self.environment = child_environment(environment)
        self.stop_within = stop_within
        self.stop_together = stop_together
        self.started: list[Process] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Attach `logs()` to the failure of the block, if any, then `stop()`."""
        if error is not None:
            error.add_note(self.logs())
        await self.stop()

    def start(self, name: str, *arguments: str) -> Process:
        """`fusillade ARGUMENTS` (see `start()`), logged as `name`."""
        process = start(
            self.directory, name, arguments, environment=self.environment, stop_within=self.stop_within
        )
        self.started.append(process)
        return process

    async def serve(
        self, *arguments: str, command: str = "serve", name: str | None = None, check: ReadyCheck | None = None
    ) -> tuple[Process, str]:
        """`fusillade serve` (or `api`) `--port 0 ARGUMENTS`, named after the command unless `name` says
        otherwise; the process and its URL once it is ready (`Process.ready`)."""
        process = self.start(name or command, command, "--port", "0", *arguments)
        return process, await process.ready(check=check)

    async def mock_upstream(self, *flags: str, name: str = "mock-upstream") -> str:
        """`fusillade mock-upstream --port 0 FLAGS`; its URL once it listens (the first line of its stdout)."""
        process = self.start(name, "mock-upstream", "--port", "0", *flags)

        def url() -> str | None:
            process.check_running()
            first, newline, _ = process.stdout.read_text().partition("\n")
            return first.strip() if newline else None

        found = await polling.until(url, within=START_WITHIN, interval=0.05, message=f"{name} to print its URL")
        assert found is not None
        return found

    async def cli(self, *arguments: str, within: float = CLI_WITHIN) -> tuple[int, str, str]:
        """A one-shot command (`migrate`, `keys create`, ...) in the same directory and environment: its exit
        code, stdout and stderr. Killed if it runs longer than `within` seconds (TimeoutError)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fusillade",
            *arguments,
            cwd=self.directory,
            env=self.environment,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=within)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return process.returncode, stdout.decode(), stderr.decode()

    def logs(self, *, last: int | None = None) -> str:
        """`Process.report()` of every process, or of the `last` few started."""
        shown = self.started if last is None else self.started[-last:]
        return "\n".join(process.report() for process in shown)

    @contextlib.contextmanager
    def logs_on_failure(self, *notes: str, last: int | None = None) -> Iterator[None]:
        """Attach `notes` and then `logs(last=last)` to any exception raised in the block (pytest shows them under
        the failure)."""
        try:
            yield
        except BaseException as error:
            for note in notes:
                error.add_note(note)
            error.add_note(self.logs(last=last))
            raise

    async def stop(self) -> dict[str, int]:
        """Stop every process still running (`Process.stop`), in the order the class describes; every exit code
        by name."""
        last_first = list(reversed(self.started))
        if self.stop_together:
            await asyncio.gather(*(process.stop() for process in last_first))
        else:
            for process in last_first:
                await process.stop()
        return {process.name: process.popen.returncode for process in self.started}
