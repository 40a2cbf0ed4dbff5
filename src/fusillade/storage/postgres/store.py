"""`PostgresStorage`: the storage contract (`storage.base.Storage`) on PostgreSQL through an asyncpg pool.

The role modules (`files`, `batches`, `lifecycle`, `queue`, `daemons`, `keys`, `retention`) hold the SQL and take a
connection; this class owns the pool and the clock, opens the transactions, and reads the time once per
transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, lines, models, served, states, usage_report
from fusillade.storage import base, refusals
from fusillade.storage.postgres import (
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
    usage,
)
from fusillade.storage.postgres.connection import Database

MIGRATION_TIMEOUT_S = 600.0
"""Longest wait for another process's migration, and longest single migration."""


class PostgresStorage:
    """Every storage role on one PostgreSQL database. Open with `await PostgresStorage.connect(url)`, then
    `await store.migrate()` once at startup."""

    def __init__(self, database: Database, *, clock: clocks.WallClock) -> None:
        self._db = database
        self._clock = clock
        self._budgeted = fenced_writes.BudgetedBatches()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        clock: clocks.WallClock | None = None,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout_s: float = base.DEFAULT_DATABASE_TIMEOUT.total_seconds(),
    ) -> PostgresStorage:
        """Open a pool on `url` (`postgresql://…`). Does not migrate. `StorageUnavailable` if the server
        cannot be reached within the timeout. `command_timeout_s` (the configuration's `database_timeout`) bounds
        every wait for the database, a silent one included (see `Database.open`)."""
        database = await Database.open(
            url, min_size=min_size, max_size=max_size, command_timeout_s=command_timeout_s
        )
        return cls(database, clock=clock or clocks.SystemClock())

    # ---------------------------------------------------------------------------------------- lifecycle

    async def migrate(self) -> list[str]:
        async with self._db.connection() as connection:
            return await migration.run(connection, self._clock, timeout_s=MIGRATION_TIMEOUT_S)

    async def ping(self) -> None:
        async with self._db.connection() as connection:
            await connection.fetchval("SELECT 1")

    async def close(self) -> None:
        await self._db.close()

    # -------------------------------------------------------------------------------------------- files

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
        now = self._clock.now()
        file_id = ids.new_file_id()
        seen = served.SeenModels(record_model) if record_model is not None else None
        try:
            async with self._db.transaction() as connection:
                count = 0
                chunks = files.template_chunks(templates, files.TEMPLATE_CHUNK_ROWS)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        await files.insert_templates(connection, file_id, chunk)
                        count += len(chunk)
                        if seen is not None:
                            for template in chunk:
                                seen.add(template.model)
                if count == 0:
                    raise refusals.empty_file()
                if seen is not None and seen.models:
                    await models_seen.record_seen(connection, owner=owner, found=seen.models, now=now)
                file = models.File(
                    id=file_id,
                    owner=owner,
                    filename=filename,
                    purpose=states.FilePurpose.BATCH,
                    bytes=size_bytes,
                    created_at=now,
                    expires_at=expires_at,
                    request_count=count,
                )
                await files.insert_file(connection, file)
                return file
        except files.TemplateSourceError as failure:
            original = failure.original
        # Outside the `except` block, so the caller's exception comes back exactly as it was raised.
        raise original

    async def get_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> models.File:
        async with self._db.connection() as connection:
            return await files.fetch_file(connection, file_id, owner)

    async def list_models_seen(
        self, *, owner: models.OwnerScope, model: str | None = None, limit: int = served.SEEN_LISTED
    ) -> list[served.SeenModel]:
        async with self._db.connection() as connection:
            return await models_seen.list_seen(connection, owner=owner, model=model, limit=limit)

    async def list_files(
        self,
        *,
        owner: models.OwnerScope,
        purpose: states.FilePurpose | None = None,
        after: ids.FileId | None = None,
        limit: int = 10_000,
        order: base.SortOrder = "desc",
    ) -> models.Page[models.File]:
        async with self._db.connection() as connection:
            return await files.list_files(
                connection, owner=owner, purpose=purpose, after=after, limit=limit, order=order
            )

    async def delete_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> None:
        now = self._clock.now()
        async with self._db.connection() as connection:
            await files.delete_file(connection, file_id, owner, now)

    async def open_file_content(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> AsyncIterator[bytes]:
        file = await self.get_file(file_id, owner=owner)
        if file.purpose is states.FilePurpose.BATCH:
            return self._input_content(file.id)
        if file.batch_id is None:
            raise errors.StorageError(f"Result file {ids.file_wire(file.id)} has no batch.")
        return self._result_content(file.batch_id, file.purpose)

    async def _input_content(self, file_id: ids.FileId) -> AsyncIterator[bytes]:
        after_line = 0
        while True:
            async with self._db.connection() as connection:
                page = await files.input_page(connection, file_id, after_line)
            if not page:
                return
            yield b"".join(lines.input_line(template) for template in page)
            if len(page) < files.CONTENT_PAGE_ROWS:
                return
            after_line = page[-1].line_number

    async def _result_content(self, batch_id: ids.BatchId, purpose: states.FilePurpose) -> AsyncIterator[bytes]:
        if purpose is states.FilePurpose.BATCH_OUTPUT:
            async for chunk in self._output_content(batch_id):
                yield chunk
            return
        cursor: tuple[datetime, ids.RequestId] | None = None
        while True:
            async with self._db.connection() as connection:
                page = await files.result_page(connection, batch_id, purpose, cursor)
            if not page:
                return
            yield b"".join(lines.result_line(request) for request in page)
            if len(page) < files.CONTENT_PAGE_ROWS:
                return
            last = page[-1]
            assert last.finished_at is not None  # terminal requests always have one
            cursor = (last.finished_at, last.id)

    async def _output_content(self, batch_id: ids.BatchId) -> AsyncIterator[bytes]:
        cursor: files.OutputCursor | None = None
        while True:
            async with self._db.connection() as connection:
                chunk, count, cursor = await files.output_page(connection, batch_id, cursor)
            if chunk:
                yield chunk
            if count < files.CONTENT_PAGE_ROWS:
                return

    # ------------------------------------------------------------------------------------------ batches

    async def create_batch(self, spec: models.BatchSpec) -> models.Batch:
        window = models.parse_completion_window(spec.completion_window)
        now = self._clock.now()
        async with self._db.transaction() as connection:
            return await batches.create_batch(connection, spec, window=window, now=now)

    async def get_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        async with self._db.connection() as connection:
            return await batches.fetch_batch(connection, batch_id, owner)

    async def list_batches(
        self, *, owner: models.OwnerScope, after: ids.BatchId | None = None, limit: int = 20
    ) -> models.Page[models.Batch]:
        async with self._db.connection() as connection:
            return await batches.list_batches(connection, owner=owner, after=after, limit=limit)

    async def cancel_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        now = self._clock.now()
        async with self._db.transaction() as connection:
            await lifecycle.cancel_batch(connection, batch_id, owner, now)
            return await batches.fetch_batch(connection, batch_id, owner)

    async def retry_failed(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Retried:
        now = self._clock.now()
        async with self._db.transaction() as connection:
            moved = await lifecycle.retry_failed(connection, batch_id, owner, now)
            return models.Retried(moved, await batches.fetch_batch(connection, batch_id, owner))

    async def delete_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> None:
        now = self._clock.now()
        async with self._db.transaction() as connection:
            await lifecycle.delete_batch(connection, batch_id, owner, now)

    async def list_requests(
        self,
        batch_id: ids.BatchId,
        *,
        owner: models.OwnerScope,
        state: states.RequestState | None = None,
        after: ids.RequestId | None = None,
        limit: int = 100,
    ) -> models.Page[models.Request]:
        async with self._db.connection() as connection:
            return await batches.list_requests(
                connection, batch_id, owner=owner, state=state, after=after, limit=limit
            )

    async def expire_batches(self, *, grace: timedelta = timedelta(0), limit: int = 100) -> list[ids.BatchId]:
        now = self._clock.now()
        async with self._db.transaction() as connection:
            return await lifecycle.expire_batches(connection, grace=grace, limit=limit, now=now)

    async def finalize_batches(self, *, limit: int = 100) -> list[ids.BatchId]:
        now = self._clock.now()
        async with self._db.transaction() as connection:
            return await lifecycle.finalize_batches(connection, limit=limit, now=now)

    # ------------------------------------------------------------------------------------ request queue

    async def claim_requests(
        self,
        daemon_id: ids.DaemonId,
        capacities: Sequence[models.ModelCapacity],
        *,
        limit: int,
        owner_in_flight: Mapping[str, int] | None = None,
    ) -> models.Claimed:
        plan = queue.plan_claim(capacities, limit)
        if plan is None:
            return models.Claimed()
        now = self._clock.now()
        async with self._db.connection() as connection:
            return await queue.claim(connection, plan, daemon_id, owner_in_flight=owner_in_flight, now=now)

    async def apply_writes(
        self, daemon_id: ids.DaemonId, writes: Sequence[models.RequestWrite]
    ) -> models.WriteReport:
        named = fenced_writes.named_requests(writes)
        if not writes:
            return models.WriteReport()
        now = self._clock.now()
        async with self._db.connection() as connection:
            return await fenced_writes.apply_writes(
                connection, daemon_id, writes, named, now=now, budgeted=self._budgeted
            )

    async def apply_writes_and_claim(
        self,
        daemon_id: ids.DaemonId,
        writes: Sequence[models.RequestWrite],
        capacities: Sequence[models.ModelCapacity],
        *,
        limit: int,
        owner_in_flight: Mapping[str, int] | None = None,
    ) -> tuple[models.WriteReport, models.Claimed]:
        named = fenced_writes.named_requests(writes)
        plan = queue.plan_claim(capacities, limit)
        now = self._clock.now()
        report = models.WriteReport()
        # One pooled connection for both parts; each is its own transaction, as when called apart.
        async with self._db.connection() as connection:
            if writes:
                report = await fenced_writes.apply_writes(
                    connection, daemon_id, writes, named, now=now, budgeted=self._budgeted
                )
            if plan is None:
                return report, models.Claimed()
            claimed = await queue.claim(connection, plan, daemon_id, owner_in_flight=owner_in_flight, now=now)
        return report, claimed

    async def cancelling_requests(self, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
        async with self._db.connection() as connection:
            return await queue.cancelling_requests(connection, daemon_id)

    async def in_flight_by_model(self) -> dict[str, int]:
        async with self._db.connection() as connection:
            return await queue.in_flight_by_model(connection)

    async def pending_models(self) -> list[str]:
        async with self._db.connection() as connection:
            return await queue.pending_models(connection)

    async def held_requests(self, daemon_id: ids.DaemonId) -> list[ids.RequestId]:
        async with self._db.connection() as connection:
            return await queue.held_requests(connection, daemon_id)

    async def maintain_queue(self) -> None:
        async with self._db.connection() as connection:
            await queue.vacuum(connection)

    # ---------------------------------------------------------------------------------------- daemons

    async def register_daemon(self, info: models.DaemonInfo) -> models.DaemonRecord:
        now = self._clock.now()
        async with self._db.connection() as connection:
            return await daemons.register_daemon(connection, info, now)

    async def heartbeat(
        self, daemon_id: ids.DaemonId, *, in_flight: int = 0, limits: Mapping[str, int] | None = None
    ) -> models.DaemonRecord:
        now = self._clock.now()
        async with self._db.connection() as connection:
            return await daemons.heartbeat(connection, daemon_id, in_flight, limits, now)

    async def mark_daemon_dead(self, daemon_id: ids.DaemonId) -> None:
        now = self._clock.now()
        async with self._db.connection() as connection:
            await daemons.mark_daemon_dead(connection, daemon_id, now)

    async def list_daemons(self) -> list[models.DaemonRecord]:
        async with self._db.connection() as connection:
            return await daemons.list_daemons(connection)

    async def reclaim_requests(self, *, stale_after: timedelta, limit: int = 1000) -> int:
        now = self._clock.now()
        async with self._db.transaction() as connection:
            return await daemons.reclaim_requests(connection, stale_after=stale_after, limit=limit, now=now)

    # ------------------------------------------------------------------------------------------- usage

    async def usage_report(
        self, *, owner: models.OwnerScope, since: date | None, by: usage_report.UsageGrouping
    ) -> list[usage_report.UsageRow]:
        async with self._db.connection() as connection:
            return await usage.usage_report(connection, owner=owner, since=since, by=by)

    # -------------------------------------------------------------------------------------- retention

    async def purge_deleted(self, *, limit: int = 1000) -> int:
        async with self._db.connection() as connection:
            return await retention.purge_deleted(connection, limit=limit)

    # --------------------------------------------------------------------------------------- api keys

    async def create_api_key(
        self, *, owner: str, name: str, key_hash: str, prefix: str, admin: bool = False
    ) -> models.ApiKey:
        now = self._clock.now()
        async with self._db.connection() as connection:
            return await keys.create_api_key(
                connection, owner=owner, name=name, key_hash=key_hash, prefix=prefix, admin=admin, now=now
            )

    async def find_api_key(self, key_hash: str) -> models.ApiKey | None:
        async with self._db.connection() as connection:
            return await keys.find_api_key(connection, key_hash)

    async def list_api_keys(self, *, owner: models.OwnerScope = models.ALL_OWNERS) -> list[models.ApiKey]:
        async with self._db.connection() as connection:
            return await keys.list_api_keys(connection, owner=owner)

    async def revoke_api_key(self, key_id: ids.ApiKeyId) -> models.ApiKey:
        now = self._clock.now()
        async with self._db.connection() as connection:
            return await keys.revoke_api_key(connection, key_id, now)
