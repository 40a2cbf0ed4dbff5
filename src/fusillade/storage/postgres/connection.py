"""The asyncpg pool of the PostgreSQL backend: codecs, timeouts, transactions, and the translation of driver
exceptions into fusillade's storage errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import orjson

from fusillade import errors

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    """The connection type the role modules receive (a pooled connection)."""
else:
    Connection = asyncpg.pool.PoolConnectionProxy

# Errors that mean "the database is not reachable or did not answer in time": retrying later may work.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError (asyncio's too, since 3.11) and refused connections
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,  # class 08, e.g. ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # class 57: canceled query, shutdown, CannotConnectNow
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InternalClientError,  # the client's protocol state broke, e.g. after the server dropped the session
)


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Turn driver exceptions raised inside the block into `StorageUnavailable` / `StorageError` (with the
    driver's exception as `__cause__`); everything else passes unchanged."""
    try:
        yield
    except errors.FusilladeError:
        raise
    except asyncpg.exceptions.ClientConfigurationError as exc:
        raise errors.ConfigurationError(f"The PostgreSQL connection URL is invalid: {_describe(exc)}") from exc
    except asyncpg.exceptions.DataError as exc:  # a value the driver cannot send: retrying will not help
        # Its message quotes the value (user data, which no log may hold): only its kind is kept.
        raise errors.StorageError(f"The database driver rejected a value: {_kind(exc)}") from exc
    except _UNAVAILABLE as exc:
        raise errors.StorageUnavailable(f"The database is unavailable: {_describe(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise errors.StorageError(f"The database reported an error: {_describe(exc)}") from exc


def _kind(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} (SQLSTATE {sqlstate})" if sqlstate else type(exc).__name__


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _init_connection(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(
            type_name,
            encoder=_encode_json,
            decoder=orjson.loads,
            schema="pg_catalog",
            format="text",
        )


async def _keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """Give a connection back to the pool as it is. The default reset (`RESET ALL`, `CLOSE ALL`, `UNLISTEN *`,
    unlock all advisory locks) is a round trip on every release, as costly as the claim that used the
    connection; this backend leaves no session state behind (no `SET`, `LISTEN`, cursors, or session locks
    but the migration lock, released in a `finally`). The pool still rolls back an open transaction."""


def _encode_json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _roll_back(connection: Connection, transaction: asyncpg.transaction.Transaction) -> None:
    """Roll back after the block failed. If that fails too (the connection broke, or a cancelled query left it
    busy), drop the connection so the pool replaces it, and let the block's own exception propagate (unless
    the task is cancelled meanwhile: cancellation wins)."""
    try:
        await transaction.rollback()
    except asyncio.CancelledError:
        connection.terminate()
        raise
    except Exception:
        connection.terminate()


def _drop_if_broken(connection: Connection, exc: BaseException) -> bool:
    """A connection whose statement was interrupted (cancelled, timed out, cut off by the server) may still be
    in the middle of a protocol exchange: never give it back to the pool, where the next user would fail with
    "another operation is in progress". SQL errors leave it usable. True if the connection was dropped (it is
    then detached from the pool: nothing more may be called on it)."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _UNAVAILABLE):
        return False
    if isinstance(exc, errors.FusilladeError):
        return False
    with contextlib.suppress(asyncpg.InterfaceError):  # already detached: the pool saw the connection close
        connection.terminate()
    return True


class Database:
    """An asyncpg pool with a bounded wait for a connection and a default timeout on every statement."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, acquire_timeout_s: float) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    @classmethod
    async def open(cls, url: str, *, min_size: int, max_size: int, command_timeout_s: float) -> Database:
        """Open the pool (and its first connections); `StorageUnavailable` if the server cannot be reached.
        `command_timeout_s` bounds connecting, waiting for a pooled connection and every statement (but the
        migration and vacuum, which pass their own), and is the server's `idle_in_transaction_session_timeout`."""
        with translated_errors():
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    url,
                    min_size=min_size,
                    max_size=max_size,
                    command_timeout=command_timeout_s,
                    timeout=command_timeout_s,
                    init=_init_connection,
                    reset=_keep_session,
                    server_settings={
                        # Short OLTP statements: compiling a plan with JIT would cost more than running it.
                        "jit": "off",
                        # A transaction whose client went silent (a network cut: no FIN, no RST) would keep its
                        # locks and hold back vacuum until the server's TCP keepalive gives up, hours later; the
                        # client gave up on it after `command_timeout_s` anyway.
                        "idle_in_transaction_session_timeout": str(max(1, round(command_timeout_s * 1000))),
                    },
                ),
                timeout=command_timeout_s * 2,
            )
        return cls(pool, acquire_timeout_s=command_timeout_s)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection in autocommit mode (each statement is its own transaction); driver errors
        raised in the block are translated."""
        with translated_errors():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as connection:
                try:
                    yield connection
                except BaseException as exc:
                    _drop_if_broken(connection, exc)
                    raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection inside one transaction, committed when the block ends and rolled back if it
        raises; driver errors raised in the block are translated, other exceptions pass unchanged."""
        with translated_errors():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as connection:
                transaction = connection.transaction()
                await transaction.start()
                try:
                    yield connection
                except BaseException as exc:
                    if not _drop_if_broken(connection, exc):
                        await _roll_back(connection, transaction)
                    raise
                try:
                    await transaction.commit()
                except BaseException as exc:
                    _drop_if_broken(connection, exc)
                    raise

    async def close(self) -> None:
        """Close the pool, waiting a bounded time for borrowed connections; terminate them after that."""
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._acquire_timeout_s)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._pool.terminate()
