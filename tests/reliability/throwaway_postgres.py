"""A PostgreSQL cluster of one test, which the test may stop and start again on the same port (the database
restart scenario). Built from the Debian binaries in `/usr/lib/postgresql/<version>/bin` (initdb + pg_ctl), so
it does not need, or touch, the machine's own server; as root it runs as the `postgres` OS user.

Durability: `fsync` is off (the machine does not crash in these tests; the operating system keeps what was
written), but `synchronous_commit` stays on: a commit is acknowledged only once its WAL reached the operating
system, so an immediate stop (a crash of PostgreSQL alone) loses no acknowledged commit, and the scenario can
demand that nothing be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import tempfile
from pathlib import Path

from tests.support import postgres

PG_CTL_WITHIN = 60.0
"""Seconds initdb and each pg_ctl command get."""


class ClusterError(RuntimeError):
    """The cluster could not be created, started or stopped."""


class ThrowawayCluster:
    """`await ThrowawayCluster.create()`, then `start()` / `stop()` as often as wanted; `destroy()` stops it
    and deletes its files."""

    def __init__(self, bin_dir: Path, workdir: Path, port: int, prefix: list[str]) -> None:
        self._bin = bin_dir
        self.workdir = workdir
        self.port = port
        self._prefix = prefix
        self.running = False

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @classmethod
    async def create(cls) -> ThrowawayCluster:
        """initdb a new cluster on a free port (not started)."""
        bin_dir = postgres.find_binaries()
        if bin_dir is None:
            raise ClusterError(
                f"No {postgres.DEBIAN_BINARIES}/<version>/bin with initdb and pg_ctl: install PostgreSQL "
                "(apt-get install postgresql) to run the database restart scenario."
            )
        prefix: list[str] = []
        workdir = Path(tempfile.mkdtemp(prefix="fusillade-pg-restart-"))
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(workdir, ignore_errors=True)
                raise ClusterError(
                    "Running as root and there is no `postgres` OS user to run the cluster."
                ) from None
            os.chown(workdir, account.pw_uid, account.pw_gid)
            prefix = ["runuser", "-u", "postgres", "--"]
        cluster = cls(bin_dir, workdir, postgres.free_port(), prefix)
        try:
            await cluster._run(
                "initdb", "-D", str(cluster.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale",
                "--no-sync",
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cluster

    async def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.workdir} "
            "-c fsync=off -c full_page_writes=off -c max_connections=100"
        )
        wait = ("-w", "-t", str(int(PG_CTL_WITHIN)))
        await self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, *wait, "start")
        self.running = True

    async def stop(self, mode: str = "immediate") -> None:
        """`pg_ctl stop -m MODE` (`immediate`: the server processes quit at once, as in a crash)."""
        await self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(PG_CTL_WITHIN)), "stop")
        self.running = False

    async def destroy(self) -> None:
        """Stop the server if it runs and delete the cluster's files."""
        if self.running:
            with contextlib.suppress(ClusterError):
                await self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def _run(self, program: str, *arguments: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._prefix,
            str(self._bin / program),
            *arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(PG_CTL_WITHIN):
                _, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ClusterError(f"{program} {' '.join(arguments)} took longer than {PG_CTL_WITHIN} s") from None
        if process.returncode != 0:
            raise ClusterError(f"{program} {' '.join(arguments)} exited {process.returncode}: {stderr.decode()}")
