"""Connections to one SQLite file: a writer thread, a pool of reader threads, pragmas, error wrapping, and the
conversions between Python values and SQLite columns.

Every operation runs as ONE function in the right thread (one thread hop per call): writes in the single writer
thread inside `BEGIN IMMEDIATE … COMMIT`, reads on a pooled reader connection inside a deferred transaction (a
consistent WAL snapshot). Several processes may open the same file; WAL, `busy_timeout` and `BEGIN IMMEDIATE`
make their writers take turns, and `WriteTurns` lets a daemon's short writes go before an API's bulk ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeVar

from fusillade import clock as clocks
from fusillade import errors
from fusillade.storage.base import WritePriority

T = TypeVar("T")

MINIMUM_SQLITE_VERSION: Final = (3, 35)
BUSY_TIMEOUT_MS: Final = 10_000
TURNS_SUFFIX: Final = "-writers"
"""The file beside the database (`fusillade.db-writers`) whose lock orders writers of different priorities."""
BUSY_POLL_S: Final = 0.0005
"""How often a HIGH writer asks again for the write lock: SQLite's own busy handler sleeps up to 100 ms between
tries, longer than the gaps between a LOW writer's transactions."""
WRITER_CACHE_KIB: Final = 32_768
READER_CACHE_KIB: Final = 8_192
STATEMENT_CACHE_SIZE: Final = 512

# Result codes (low byte of the extended code) that mean "not reachable now": retrying may help.
_UNAVAILABLE_CODES: Final = frozenset(
    {
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
    }
)
_UNAVAILABLE_WORDS: Final = ("locked", "busy", "disk i/o", "unable to open", "disk is full")

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND: Final = timedelta(microseconds=1)

WriteOperation = Callable[[sqlite3.Connection, datetime], T]
ReadOperation = Callable[[sqlite3.Connection], T]


# ------------------------------------------------------------------------------------------ conversions


def to_micros(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the Unix epoch."""
    return (moment - EPOCH) // MICROSECOND


def to_micros_or_none(moment: datetime | None) -> int | None:
    return None if moment is None else to_micros(moment)


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def from_micros_or_none(value: int | None) -> datetime | None:
    return None if value is None else EPOCH + timedelta(microseconds=value)


def to_uuid(value: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=value)


def to_uuid_or_none(value: bytes | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(bytes=value)


class TimeOrderedIds:
    """UUIDs of version 7 (RFC 9562) that increase within a process: a millisecond timestamp, then a counter
    from a random start. Requests and templates get these (SQL `new_uuid()`) so that rows created together have
    neighbouring primary-key entries: the daemons' writes by id then touch a few index pages instead of one
    random page per row."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._millis = -1
        self._random = 0
        self._counter = 0

    def next_bytes(self) -> bytes:
        millis = time.time_ns() // 1_000_000
        with self._lock:
            if millis > self._millis:
                self._millis = millis
                self._random = secrets.randbits(12)
                self._counter = secrets.randbits(60)
            else:
                self._counter += 1
            value = (self._millis << 80) | (0x7 << 76) | (self._random << 64) | (0b10 << 62) | self._counter
        return value.to_bytes(16, "big")


# ------------------------------------------------------------------------------------------------ errors


def wrap_error(exc: sqlite3.Error) -> errors.StorageError:
    """The fusillade error for a driver exception (the caller raises it `from exc`)."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    unavailable = (code is not None and code & 0xFF in _UNAVAILABLE_CODES) or (
        isinstance(exc, sqlite3.OperationalError) and any(word in text.lower() for word in _UNAVAILABLE_WORDS)
    )
    if unavailable:
        return errors.StorageUnavailable(f"The SQLite database is not available ({text}); retry later.")
    return errors.StorageError(f"The SQLite database reported an error: {text}")


def _wrapped(function: Callable[[], T]) -> Callable[[], T]:
    def call() -> T:
        try:
            return function()
        except sqlite3.Error as exc:
            raise wrap_error(exc) from exc

    return call


# ------------------------------------------------------------------------------------------- connections


def check_version() -> None:
    if sqlite3.sqlite_version_info < MINIMUM_SQLITE_VERSION:
        wanted = ".".join(str(part) for part in MINIMUM_SQLITE_VERSION)
        raise errors.ConfigurationError(
            f"fusillade needs SQLite {wanted} or newer (for RETURNING), but Python is linked against SQLite "
            f"{sqlite3.sqlite_version}. Use a Python build with a newer SQLite, or use PostgreSQL."
        )


def connect(
    path: Path, *, writer: bool, wait: bool = True, busy_timeout_ms: int = BUSY_TIMEOUT_MS
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with fusillade's pragmas. `wait=False`: a
    writer that never waits for another connection's lock (SQLITE_BUSY at once) and never checkpoints the WAL
    itself: the event loop's own connection (see `Database.write_on_loop`). `busy_timeout_ms=0`: SQLite never
    waits for a lock; the caller polls (`WriteTurns.begin`)."""
    busy_timeout_ms = busy_timeout_ms if wait else 0
    connection = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        cached_statements=STATEMENT_CACHE_SIZE,
        timeout=busy_timeout_ms / 1000,
    )
    try:
        connection.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        if not wait:
            connection.execute("PRAGMA wal_autocheckpoint = 0")
        if writer:
            connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = OFF")
        connection.execute("PRAGMA temp_store = MEMORY")
        cache_kib = WRITER_CACHE_KIB if writer else READER_CACHE_KIB
        connection.execute(f"PRAGMA cache_size = -{cache_kib}")
        if writer:
            connection.create_function("new_uuid", 0, TimeOrderedIds().next_bytes)
        else:
            connection.execute("PRAGMA query_only = ON")
    except BaseException:
        connection.close()
        raise
    return connection


def _rollback_if_open(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        connection.execute("ROLLBACK")


class WriteTurns:
    """Turns between the writing processes of one SQLite file, by `WritePriority`, kept with `flock` on a file
    beside the database. A HIGH writer holds that lock exclusively from before it asks SQLite for the write lock
    until it commits; a LOW writer takes it shared and lets it go before each of its transactions, so it waits
    while a HIGH write is announced or under way, and a HIGH writer waits at most for the LOW transaction already
    running. `flock` locks belong to an open file, not to a process: stores of one process do not merge them.
    Blocking calls run in the writer thread, never on the event loop."""

    def __init__(self, path: Path, priority: WritePriority) -> None:
        self.priority = priority
        self._fd: int | None = None
        if priority is not WritePriority.NORMAL:
            self._fd = os.open(path.with_name(path.name + TURNS_SUFFIX), os.O_RDWR | os.O_CREAT, 0o600)

    def begin(self, connection: sqlite3.Connection) -> None:
        """Take this writer's turn and `BEGIN IMMEDIATE` (blocking). A HIGH writer's turn lasts until `end`."""
        self.announce()
        self.start(connection)

    def announce(self, *, wait: bool = True) -> bool:
        """Take this writer's turn (a HIGH writer then holds it until `end`), waiting for it; without `wait` (on
        the event loop), False when it is not free now, and nothing is taken."""
        if self._fd is None:
            return True
        mode = fcntl.LOCK_EX if self.priority is WritePriority.HIGH else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if self.priority is WritePriority.LOW:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    def start(self, connection: sqlite3.Connection) -> None:
        """`BEGIN IMMEDIATE` in the turn announced (blocking); the turn ends if it fails."""
        try:
            if self.priority is WritePriority.HIGH:
                _begin_polling(connection)
            else:
                connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.end()
            raise

    def end(self) -> None:
        """End a HIGH writer's turn (after COMMIT or ROLLBACK)."""
        if self._fd is not None and self.priority is WritePriority.HIGH:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _begin_polling(connection: sqlite3.Connection) -> None:
    """`BEGIN IMMEDIATE`, asking again every `BUSY_POLL_S` while another connection writes, for up to
    `BUSY_TIMEOUT_MS` (the connection itself does not wait: its busy timeout is 0)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            connection.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if time.monotonic() >= deadline or not isinstance(wrap_error(exc), errors.StorageUnavailable):
                raise
        time.sleep(BUSY_POLL_S)


def _transaction(
    connection: sqlite3.Connection, clock: clocks.WallClock, turns: WriteTurns, operation: WriteOperation[T]
) -> T:
    """`operation` in one `BEGIN IMMEDIATE` transaction of `connection`, in this writer's turn."""
    turns.begin(connection)
    try:
        return _commit_after(connection, clock, operation)
    finally:
        turns.end()


def _commit_after(connection: sqlite3.Connection, clock: clocks.WallClock, operation: WriteOperation[T]) -> T:
    """`operation` in the transaction just begun on `connection`, then COMMIT (ROLLBACK if it raises)."""
    try:
        result = operation(connection, clock.now())
        connection.execute("COMMIT")
    except BaseException:
        _rollback_if_open(connection)
        raise
    return result


class WriteTransaction:
    """A write transaction held open across several awaited steps (see `Database.write_transaction`)."""

    def __init__(self, database: Database, now: datetime) -> None:
        self._database = database
        self.now = now

    async def run(self, operation: WriteOperation[T]) -> T:
        """Run one step inside the open transaction, in the writer thread."""
        connection = self._database.writer_connection
        return await self._database.in_writer(lambda: operation(connection, self.now))


class Database:
    """One SQLite file: one writer connection used only by one thread, and a pool of reader connections."""

    def __init__(
        self,
        path: Path,
        clock: clocks.WallClock,
        writer: sqlite3.Connection,
        writer_executor: futures.ThreadPoolExecutor,
        readers: list[sqlite3.Connection],
        reader_executor: futures.ThreadPoolExecutor,
        loop_writer: sqlite3.Connection,
        turns: WriteTurns,
    ) -> None:
        self.path = path
        self.clock = clock
        self.turns = turns
        self.writer_connection = writer
        self._loop_writer = loop_writer
        self._writer_executor = writer_executor
        self._readers = readers
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        for reader in readers:
            self._idle_readers.put(reader)
        self._reader_executor = reader_executor
        self._write_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, *, clock: clocks.WallClock, readers: int, priority: WritePriority = WritePriority.NORMAL
    ) -> Database:
        check_version()
        if readers < 1:
            raise errors.ConfigurationError("The SQLite store needs at least one reader connection.")
        loop = asyncio.get_running_loop()
        writer_executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusillade-sqlite-writer")
        reader_executor = futures.ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="fusillade-sqlite-reader"
        )
        opened: list[sqlite3.Connection] = []
        turns: WriteTurns | None = None
        # A HIGH writer polls for the write lock itself (`_begin_polling`): its connection must not wait.
        busy_timeout_ms = 0 if priority is WritePriority.HIGH else BUSY_TIMEOUT_MS
        try:
            turns = WriteTurns(path, priority)
            writer = await loop.run_in_executor(
                writer_executor, _wrapped(lambda: connect(path, writer=True, busy_timeout_ms=busy_timeout_ms))
            )
            opened.append(writer)
            for _ in range(readers):
                reader = await loop.run_in_executor(reader_executor, _wrapped(lambda: connect(path, writer=False)))
                opened.append(reader)
            loop_writer = await loop.run_in_executor(
                writer_executor, _wrapped(lambda: connect(path, writer=True, wait=False))
            )
            opened.append(loop_writer)
        except BaseException:
            for connection in opened:
                connection.close()
            if turns is not None:
                turns.close()
            writer_executor.shutdown(wait=False)
            reader_executor.shutdown(wait=False)
            raise
        return cls(path, clock, writer, writer_executor, opened[1:-1], reader_executor, loop_writer, turns)

    # ------------------------------------------------------------------------------------ thread hops

    def _check_open(self) -> None:
        if self._closed:
            raise errors.StorageUnavailable("The SQLite store is closed.")

    async def in_writer(self, function: Callable[[], T]) -> T:
        """Run `function` in the writer thread (the caller holds the write lock)."""
        self._check_open()
        return await asyncio.get_running_loop().run_in_executor(self._writer_executor, _wrapped(function))

    async def write(self, operation: WriteOperation[T]) -> T:
        """Run `operation(connection, now)` as one `BEGIN IMMEDIATE` transaction in the writer thread."""
        connection = self.writer_connection
        async with self._write_lock:
            return await self.in_writer(lambda: _transaction(connection, self.clock, self.turns, operation))

    async def write_on_loop(self, operation: WriteOperation[T]) -> T:
        """`write`, run on the event loop's thread when it can start at once: for short transactions on the hot
        path (a daemon's tick, well under a millisecond of SQLite work). Handing such a transaction to the
        writer thread costs more than running it: the thread and the busy event loop pass the GIL back and
        forth at every statement step, and each hand-over waits for the loop to let go. When this process's
        writer is busy, or another process holds the database's write lock, it goes to the writer thread
        (which waits its turn) instead of blocking the loop; the loop's connection never checkpoints the WAL
        (`checkpoint` does, in the writer thread)."""
        if self._write_lock.locked():
            return await self.write(operation)
        connection = self._loop_writer
        async with self._write_lock:
            self._check_open()
            turns = self.turns
            if not turns.announce(wait=False):
                # Another process's turn: wait for it in the writer thread, not on the loop.
                writer = self.writer_connection
                return await self.in_writer(lambda: _transaction(writer, self.clock, turns, operation))
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                turns.end()  # not held across the hand-over: a cancelled hand-over would never give it back
                failure = wrap_error(exc)
                if not isinstance(failure, errors.StorageUnavailable):
                    raise failure from exc
                # Locked by another process: wait for it in the writer thread, not on the loop.
                writer = self.writer_connection
                return await self.in_writer(lambda: _transaction(writer, self.clock, turns, operation))
            try:
                return _wrapped(lambda: _commit_after(connection, self.clock, operation))()
            finally:
                turns.end()

    async def checkpoint(self) -> None:
        """Copy the WAL back into the database file as far as readers allow (`PRAGMA wal_checkpoint(PASSIVE)`),
        in the writer thread; the WAL is then reused from its start instead of growing."""
        connection = self.writer_connection
        async with self._write_lock:
            await self.in_writer(lambda: connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    @contextlib.asynccontextmanager
    async def write_transaction(self) -> AsyncIterator[WriteTransaction]:
        """Hold the writer and one `BEGIN IMMEDIATE` transaction across several awaited steps; commit at the
        end, roll back if the body raises (the exception then propagates unchanged)."""
        connection = self.writer_connection
        clock = self.clock

        def begin() -> datetime:
            self.turns.begin(connection)
            return clock.now()

        def commit() -> None:
            try:
                connection.execute("COMMIT")
            finally:
                self.turns.end()

        def roll_back() -> None:
            try:
                _rollback_if_open(connection)
            finally:
                self.turns.end()

        async with self._write_lock:
            now = await self.in_writer(begin)
            try:
                yield WriteTransaction(self, now)
                await self.in_writer(commit)
            except BaseException:
                # Shielded: a cancelled caller must not drop the rollback from the writer's queue.
                await asyncio.shield(self.in_writer(roll_back))
                raise

    async def read(self, operation: ReadOperation[T]) -> T:
        """Run `operation(connection)` on a reader connection inside one read transaction (one snapshot)."""
        idle = self._idle_readers

        def transaction() -> T:
            connection = idle.get()
            try:
                connection.execute("BEGIN")
                try:
                    return operation(connection)
                finally:
                    _rollback_if_open(connection)
            finally:
                idle.put(connection)

        self._check_open()
        return await asyncio.get_running_loop().run_in_executor(self._reader_executor, _wrapped(transaction))

    # -------------------------------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Wait for running work, then close every connection (idempotent)."""
        if self._closed:
            return
        async with self._write_lock:
            self._closed = True
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._writer_executor.shutdown(wait=True)
        self._reader_executor.shutdown(wait=True)
        for connection in [self.writer_connection, *self._readers, self._loop_writer]:
            connection.close()
        self.turns.close()
