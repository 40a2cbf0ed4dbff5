"""`SqliteStorage`: the embedded backend, every role of `storage.base.Storage` on one SQLite file.

Each method is one transaction run as one function in a database thread (`connection.Database`); the SQL and
the row mapping live in the role modules (`files`, `batches`, `queue`, `daemons`, `keys`, `retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Final

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, models, served, states, usage_report
from fusillade.domain.rate_limit import TokenBucket
from fusillade.storage import base, refusals
from fusillade.storage.sqlite import (
    batches,
    daemons,
    fenced_writes,
    files,
    keys,
    lifecycle,
    migration,
    models_seen,
    queue,
    retention,
    uploads,
    usage,
)
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite.token_limits import TokenLimits

TEMPLATE_CHUNK_ROWS: Final = 1000
"""Templates inserted per transaction of an upload (a few milliseconds of the write lock; bounds the memory an
upload holds)."""


class SqliteStorage:
    """The storage contract on one SQLite file (WAL mode; several processes may share it)."""

    def __init__(self, database: connections.Database) -> None:
        self._database = database
        self._buckets: dict[str, TokenBucket] = {}
        """The request buckets of rate-limited models: in this process, as one process claims on SQLite (its
        daemon); claims run one at a time (each a write transaction)."""
        self._tokens = TokenLimits()
        """The token buckets of models with `tokens_per_minute`, and the estimates their results correct."""

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        clock: clocks.WallClock | None = None,
        readers: int = 4,
        write_priority: base.WritePriority = base.WritePriority.NORMAL,
    ) -> SqliteStorage:
        """Open (or create) the database file. Does not migrate: call `migrate()`."""
        database = await connections.Database.open(
            Path(path), clock=clock or clocks.SystemClock(), readers=readers, priority=write_priority
        )
        return cls(database)

    # -------------------------------------------------------------------------------------- lifecycle

    async def migrate(self) -> list[str]:
        return await migration.run(self._database)

    async def ping(self) -> None:
        await self._database.read(lambda connection: connection.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._database.close()

    # ------------------------------------------------------------------------------------------ files

    async def create_file(
        self,
        *,
        owner: str,
        filename: str,
        templates: AsyncIterable[models.TemplateInput] | Iterable[models.TemplateInput],
        size_bytes: int,
        expires_at: datetime | None = None,
        record_model: Callable[[str], bool] | None = None,
    ) -> models.File:
        """Stored in short transactions (`uploads`): the templates a chunk at a time while the rest is still being
        read and validated, then the file row, which makes them visible. The write lock is never held while the
        input is read, so daemons keep committing meanwhile. A failure removes what was stored."""
        file_id = ids.new_file_id()
        count = 0
        seen = served.SeenModels(record_model) if record_model is not None else None
        await self._database.write(functools.partial(uploads.begin, file_id=file_id))
        try:
            async with contextlib.aclosing(_as_async(templates)) as items:
                chunk: list[models.TemplateInput] = []
                chunk_bytes = 0
                async for item in items:
                    chunk.append(item)
                    chunk_bytes += len(item.body)
                    if seen is not None:
                        seen.add(item.model)
                    if len(chunk) >= TEMPLATE_CHUNK_ROWS or chunk_bytes >= base.TEMPLATE_CHUNK_BYTES:
                        await self._database.write(functools.partial(_insert_chunk, file_id=file_id, chunk=chunk))
                        count += len(chunk)
                        chunk, chunk_bytes = [], 0
                if chunk:
                    await self._database.write(functools.partial(_insert_chunk, file_id=file_id, chunk=chunk))
                    count += len(chunk)
            if count == 0:
                raise refusals.empty_file()
            return await self._database.write(
                functools.partial(
                    uploads.finish,
                    file_id=file_id,
                    owner=owner,
                    filename=filename,
                    size_bytes=size_bytes,
                    request_count=count,
                    expires_at=expires_at,
                    seen=seen.models if seen is not None else (),
                )
            )
        except BaseException:
            # Shielded: a cancelled upload still removes what it stored (else purge does, after an hour).
            await asyncio.shield(self._abandon_upload(file_id))
            raise

    async def _abandon_upload(self, file_id: ids.FileId) -> None:
        with contextlib.suppress(errors.StorageError):
            while not await self._database.write(functools.partial(uploads.abandon_step, file_id=file_id)):
                pass

    async def get_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> models.File:
        return await self._database.read(lambda connection: files.get_file(connection, file_id, owner))

    async def list_models_seen(
        self, *, owner: models.OwnerScope, model: str | None = None, limit: int = served.SEEN_LISTED
    ) -> list[served.SeenModel]:
        return await self._database.read(
            functools.partial(models_seen.list_seen, owner=owner, model=model, limit=limit)
        )

    async def list_files(
        self,
        *,
        owner: models.OwnerScope,
        purpose: states.FilePurpose | None = None,
        after: ids.FileId | None = None,
        limit: int = 10_000,
        order: base.SortOrder = "desc",
    ) -> models.Page[models.File]:
        return await self._database.read(
            functools.partial(
                files.list_files, owner=owner, purpose=purpose, after=after, limit=limit, order=order
            )
        )

    async def delete_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> None:
        await self._database.write(lambda connection, now: files.delete_file(connection, now, file_id, owner))

    async def open_file_content(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> AsyncIterator[bytes]:
        source = await self._database.read(lambda connection: files.content_source(connection, file_id, owner))
        return self._stream_content(source)

    async def _stream_content(self, source: files.ContentSource) -> AsyncIterator[bytes]:
        cursor: files.Cursor | None = files.FIRST_CURSOR
        while cursor is not None:
            chunk, cursor = await self._database.read(
                functools.partial(files.content_page, source=source, cursor=cursor)
            )
            if chunk:
                yield chunk

    # ---------------------------------------------------------------------------------------- batches

    async def create_batch(self, spec: models.BatchSpec) -> models.Batch:
        try:
            return await self._database.write(lambda connection, now: batches.create_batch(connection, now, spec))
        except errors.StorageError as exc:
            # Two creates with one idempotency key raced (in two processes): the loser returns the winner.
            if spec.idempotency_key is None or not isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise
            winner = await self._database.read(
                lambda connection: batches.find_by_idempotency_key(connection, spec)
            )
            if winner is None:
                raise
            return winner

    async def get_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        return await self._database.read(lambda connection: batches.get_batch(connection, batch_id, owner))

    async def list_batches(
        self, *, owner: models.OwnerScope, after: ids.BatchId | None = None, limit: int = 20
    ) -> models.Page[models.Batch]:
        return await self._database.read(
            functools.partial(batches.list_batches, owner=owner, after=after, limit=limit)
        )

    async def cancel_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        return await self._database.write(
            lambda connection, now: lifecycle.cancel_batch(connection, now, batch_id, owner)
        )

    async def retry_failed(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Retried:
        return await self._database.write(
            lambda connection, now: models.Retried(
                lifecycle.retry_failed(connection, now, batch_id, owner),
                batches.get_batch(connection, batch_id, owner),
            )
        )

    async def delete_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> None:
        await self._database.write(functools.partial(lifecycle.delete_batch, batch_id=batch_id, owner=owner))

    async def list_requests(
        self,
        batch_id: ids.BatchId,
        *,
        owner: models.OwnerScope,
        state: states.RequestState | None = None,
        after: ids.RequestId | None = None,
        limit: int = 100,
    ) -> models.Page[models.Request]:
        return await self._database.read(
            lambda connection: batches.list_requests(
                connection, batch_id, owner=owner, state=state, after=after, limit=limit
            )
        )

    async def expire_batches(self, *, grace: timedelta = timedelta(0), limit: int = 100) -> list[ids.BatchId]:
        return await self._database.write(functools.partial(lifecycle.expire_batches, grace=grace, limit=limit))

    async def finalize_batches(self, *, limit: int = 100) -> list[ids.BatchId]:
        return await self._database.write(functools.partial(lifecycle.finalize_batches, limit=limit))

    # ---------------------------------------------------------------------------------- request queue

    async def claim_requests(
        self,
        daemon_id: ids.DaemonId,
        capacities: Sequence[models.ModelCapacity],
        *,
        limit: int,
        owner_in_flight: Mapping[str, int] | None = None,
    ) -> models.Claimed:
        if limit <= 0 or not any(capacity.free > 0 for capacity in capacities):
            return models.Claimed()
        return await self._database.write(
            lambda connection, now: self._claim(connection, now, daemon_id, capacities, limit, owner_in_flight)
        )

    def _claim(
        self,
        connection: sqlite3.Connection,
        now: datetime,
        daemon_id: ids.DaemonId,
        capacities: Sequence[models.ModelCapacity],
        limit: int,
        owner_in_flight: Mapping[str, int] | None,
    ) -> models.Claimed:
        """The claim, with this process's rate buckets (SQLite: one process claims)."""
        return queue.claim_requests(
            connection,
            now,
            daemon_id,
            capacities,
            limit=limit,
            owner_in_flight=owner_in_flight,
            buckets=self._buckets,
            tokens=self._tokens,
        )

    def _apply(
        self,
        connection: sqlite3.Connection,
        now: datetime,
        daemon_id: ids.DaemonId,
        writes: Sequence[models.RequestWrite],
    ) -> models.WriteReport:
        """The writes, and the token buckets corrected by the usage of their completions."""
        report = fenced_writes.apply_writes(connection, now, daemon_id, writes)
        self._tokens.correct(writes, now.timestamp())
        return report

    async def apply_writes(
        self, daemon_id: ids.DaemonId, writes: Sequence[models.RequestWrite]
    ) -> models.WriteReport:
        _one_write_per_request(writes)
        if not writes:
            return models.WriteReport()
        return await self._database.write(lambda connection, now: self._apply(connection, now, daemon_id, writes))

    async def apply_writes_and_claim(
        self,
        daemon_id: ids.DaemonId,
        writes: Sequence[models.RequestWrite],
        capacities: Sequence[models.ModelCapacity],
        *,
        limit: int,
        owner_in_flight: Mapping[str, int] | None = None,
    ) -> tuple[models.WriteReport, models.Claimed]:
        _one_write_per_request(writes)
        claiming = limit > 0 and any(capacity.free > 0 for capacity in capacities)
        if not writes and not claiming:
            return models.WriteReport(), models.Claimed()

        def tick(
            connection: sqlite3.Connection, now: datetime
        ) -> tuple[models.WriteReport, models.Claimed | errors.StateConflict]:
            report = models.WriteReport()
            if writes:
                report = self._apply(connection, now, daemon_id, writes)
            if not claiming:
                return report, models.Claimed()
            # A refused claim (dead daemon) must not undo the writes: it checks before changing anything, and
            # its error is handed back instead of raised, so that the transaction commits.
            try:
                return report, self._claim(connection, now, daemon_id, capacities, limit, owner_in_flight)
            except errors.StateConflict as exc:
                return report, exc

        report, claimed = await self._database.write_on_loop(tick)
        if isinstance(claimed, errors.StateConflict):
            raise claimed
        return report, claimed

    async def cancelling_requests(self, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
        return await self._database.read(lambda connection: queue.cancelling_requests(connection, daemon_id))

    async def in_flight_by_model(self) -> dict[str, int]:
        return await self._database.read(queue.in_flight_by_model)

    async def pending_models(self) -> list[str]:
        return await self._database.read(queue.pending_models)

    async def held_requests(self, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
        return await self._database.read(lambda connection: queue.held_requests(connection, daemon_id))

    async def maintain_queue(self) -> None:
        """A passive checkpoint of the WAL (the daemons' ticks commit on a connection that never checkpoints,
        see `Database.write_on_loop`). Index entries need no upkeep: SQLite removes them when rows change."""
        await self._database.checkpoint()

    # -------------------------------------------------------------------------------- daemon registry

    async def register_daemon(self, info: models.DaemonInfo) -> models.DaemonRecord:
        return await self._database.write(lambda connection, now: daemons.register_daemon(connection, now, info))

    async def heartbeat(
        self, daemon_id: ids.DaemonId, *, in_flight: int = 0, limits: Mapping[str, int] | None = None
    ) -> models.DaemonRecord:
        return await self._database.write(
            lambda connection, now: daemons.heartbeat(connection, now, daemon_id, in_flight, limits)
        )

    async def mark_daemon_dead(self, daemon_id: ids.DaemonId) -> None:
        await self._database.write(lambda connection, now: daemons.mark_daemon_dead(connection, now, daemon_id))

    async def list_daemons(self) -> list[models.DaemonRecord]:
        return await self._database.read(daemons.list_daemons)

    async def reclaim_requests(self, *, stale_after: timedelta, limit: int = 1000) -> int:
        return await self._database.write(
            functools.partial(daemons.reclaim_requests, stale_after=stale_after, limit=limit)
        )

    # ------------------------------------------------------------------------------------------ usage

    async def usage_report(
        self, *, owner: models.OwnerScope, since: date | None, by: usage_report.UsageGrouping
    ) -> list[usage_report.UsageRow]:
        return await self._database.read(functools.partial(usage.usage_report, owner=owner, since=since, by=by))

    # -------------------------------------------------------------------------------------- retention

    async def purge_deleted(self, *, limit: int = 1000) -> int:
        return await self._database.write(functools.partial(retention.purge_deleted, limit=limit))

    # --------------------------------------------------------------------------------------- api keys

    async def create_api_key(
        self, *, owner: str, name: str, key_hash: str, prefix: str, admin: bool = False
    ) -> models.ApiKey:
        return await self._database.write(
            functools.partial(
                keys.create_api_key, owner=owner, name=name, key_hash=key_hash, prefix=prefix, admin=admin
            )
        )

    async def find_api_key(self, key_hash: str) -> models.ApiKey | None:
        return await self._database.read(lambda connection: keys.find_api_key(connection, key_hash))

    async def list_api_keys(self, *, owner: models.OwnerScope = models.ALL_OWNERS) -> list[models.ApiKey]:
        return await self._database.read(functools.partial(keys.list_api_keys, owner=owner))

    async def revoke_api_key(self, key_id: ids.ApiKeyId) -> models.ApiKey:
        return await self._database.write(lambda connection, now: keys.revoke_api_key(connection, now, key_id))


def _insert_chunk(
    connection: sqlite3.Connection, now: datetime, *, file_id: ids.FileId, chunk: list[models.TemplateInput]
) -> None:
    files.insert_templates(connection, now, files.template_rows(file_id, chunk))


async def _as_async(
    templates: AsyncIterable[models.TemplateInput] | Iterable[models.TemplateInput],
) -> AsyncGenerator[models.TemplateInput, None]:
    if isinstance(templates, AsyncIterable):
        async for item in templates:
            yield item
    else:
        for item in templates:
            yield item


def _satisfies_contract(store: SqliteStorage) -> base.Storage:
    """Never called: makes mypy check that `SqliteStorage` implements every method of `base.Storage`."""
    return store


def _one_write_per_request(writes: Sequence[models.RequestWrite]) -> None:
    if len({write.request_id for write in writes}) != len(writes):
        raise ValueError("Two writes for one request id in one call; send one write per request.")
