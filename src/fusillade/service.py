"""The use cases of fusillade, shared by the HTTP API and the CLI: upload an input file, create, cancel and retry
batches, read files, batches and requests. No HTTP here: the edges parse and render, this layer decides.

Uploads never sit whole in memory. `upload_file` copies the incoming chunks to a spool file (an anonymous
temporary file, deleted when closed) while counting bytes against the limit, then streams the spool file through
the JSONL validator into `Storage.create_file`, which stores the templates in one transaction: a file with any bad
line is rejected with every bad line's number and reason (up to `Limits.max_errors`), and nothing is stored.
Past the first `SpilledIds.IN_MEMORY` lines, the custom_ids seen (to refuse one used twice) go to a temporary
database on disk (`SpilledIds`), so that a file of a million lines is validated in flat memory too.

Creating a batch is safe to retry:
- with an `Idempotency-Key` (`BatchSpec.idempotency_key`), a second create by the same owner returns the first
  batch (the storage guarantees it, across processes);
- without one, a create marked `retried` (the official SDK sends `x-stainless-retry-count: 1` or more when it
  re-sends a request after a 5xx or a lost connection, and never sends a key) returns the batch of the same
  owner with the same input file, endpoint, completion window and metadata created in the last
  `RETRY_WINDOW`, if there is one, instead of creating a second. A create still running in this process when
  its retry arrives is awaited first. A create that is NOT marked retried always makes a new batch: running the
  same file twice on purpose stays possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Final

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, jsonl, models, served, states, usage_report
from fusillade.domain.prices import NO_PRICES, Prices
from fusillade.storage import base

RETRY_WINDOW: Final = timedelta(minutes=10)
"""How far back a retried create without an idempotency key looks for the batch its first attempt made."""
SPOOL_WRITE_BYTES: Final = 1024 * 1024
"""Upload chunks are gathered up to this size before each write to the spool file (one thread hop per write)."""
READ_CHUNK_BYTES: Final = 1024 * 1024
"""Chunk size when a spool file or a local file is read back for validation."""
MAX_METADATA_PAIRS: Final = 16
MAX_METADATA_KEY_LENGTH: Final = 64
MAX_METADATA_VALUE_LENGTH: Final = 512
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 255
MAX_FILENAME_LENGTH: Final = 255
DEFAULT_FILENAME: Final = "upload.jsonl"
_TWIN_PAGE: Final = 20

_Lines = Sequence[errors.LineError]


class InvalidParameter(errors.ValidationError):
    """A `ValidationError` that names the request parameter at fault (`file`, `purpose`, `endpoint`, ...), so
    that the API can report it in the OpenAI error envelope's `param`."""

    def __init__(self, param: str, message: str, *, errors: _Lines = ()) -> None:
        super().__init__(message, errors=errors)
        self.param = param


_Fingerprint = tuple[str, ids.FileId, str, str, frozenset[tuple[str, str]] | None, tuple[object, ...] | None]


class Service:
    """Use cases on one `Storage`.

    `served_models` gives the routing table in force (`served.ServedModels`); it is read at each upload and each
    models listing, so a configuration reload takes effect at once. It decides which models an upload accepts,
    which of them are recorded for the uploading owner (those going to the default route), what the message of a
    model without a route lists, and what `list_models` shows. `model_allowed` alone (without `served_models`)
    only decides which models are accepted, and nothing is recorded or listed; one of the two is required.
    `limits` are read at each upload too (`replace_limits`). `notify_work` is called after a batch is created or
    its failed requests are retried, so that a daemon in this process claims at once.
    """

    def __init__(
        self,
        storage: base.Storage,
        *,
        limits: jsonl.Limits,
        model_allowed: Callable[[str], bool] | None = None,
        served_models: Callable[[], served.ServedModels] | None = None,
        spool_directory: Path | None = None,
        notify_work: Callable[[], None] = lambda: None,
        clock: clocks.WallClock | None = None,
        prices: Prices = NO_PRICES,
    ) -> None:
        if model_allowed is None and served_models is None:
            raise ValueError("A Service needs served_models (or model_allowed) to check the models of uploads.")
        self._storage = storage
        self._limits = limits
        self._model_allowed = model_allowed
        self._served_models = served_models
        self._spool_directory = spool_directory
        self._notify_work = notify_work
        self._clock = clock or clocks.SystemClock()
        self._creating: dict[_Fingerprint, asyncio.Future[models.Batch]] = {}
        self._prices = prices

    @property
    def limits(self) -> jsonl.Limits:
        return self._limits

    def replace_limits(self, limits: jsonl.Limits) -> None:
        """New upload limits, for the next uploads (uploads already running keep theirs)."""
        self._limits = limits

    @property
    def prices(self) -> Prices:
        """The models' pricing in force, for the cost of batches (`Prices.batch_cost`)."""
        return self._prices

    def replace_prices(self, prices: Prices) -> None:
        """New pricing (a configuration reload): costs read from now on use it."""
        self._prices = prices

    # ------------------------------------------------------------------------------------------ files

    async def upload_file(self, *, owner: str, filename: str, chunks: AsyncIterable[bytes]) -> models.File:
        """Spool `chunks` to disk, validate them line by line, and store the file with its request templates.

        Raises `InvalidParameter` (param `file`) when the file is larger than the limit (at once, without
        reading further), has bad lines (each listed with its number), or holds no request. An exception raised
        by `chunks` itself propagates unchanged, and nothing is stored.
        """
        limits = self._limits
        with tempfile.TemporaryFile(dir=self._spool_directory, prefix="fusillade-upload-") as spool:
            size = await _spool(chunks, spool, limits.max_bytes)
            await asyncio.to_thread(spool.seek, 0)
            return await self._store(owner, _clean_filename(filename), _read(spool), size, limits)

    async def upload_path(self, *, owner: str, path: Path) -> models.File:
        """Validate and store a local JSONL file (the CLI's `run`); read as a stream, never whole."""
        limits = self._limits
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise InvalidParameter("file", f"Cannot read {path}: {exc.strerror or exc}.") from exc
        with handle:
            size = (await asyncio.to_thread(path.stat)).st_size
            if size > limits.max_bytes:
                raise file_too_large(limits.max_bytes)
            return await self._store(owner, _clean_filename(path.name), _read(handle), size, limits)

    async def _store(
        self, owner: str, filename: str, chunks: AsyncIterator[bytes], size: int, limits: jsonl.Limits
    ) -> models.File:
        routing = self._served_models() if self._served_models is not None else None
        templates = jsonl.validate(
            chunks, limits, model_allowed=self._model_allowed, served=routing, seen_ids=SpilledIds
        )
        try:
            return await self._storage.create_file(
                owner=owner,
                filename=filename,
                templates=templates,
                size_bytes=size,
                record_model=routing.to_default_route if routing is not None and routing.default_route else None,
            )
        except InvalidParameter:
            raise
        except errors.ValidationError as exc:
            raise InvalidParameter("file", exc.message, errors=exc.errors) from exc

    async def get_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> models.File:
        return await self._storage.get_file(file_id, owner=owner)

    async def list_files(
        self,
        *,
        owner: models.OwnerScope,
        purpose: states.FilePurpose | None = None,
        after: ids.FileId | None = None,
        limit: int = 10_000,
        order: base.SortOrder = "desc",
    ) -> models.Page[models.File]:
        return await self._storage.list_files(owner=owner, purpose=purpose, after=after, limit=limit, order=order)

    async def delete_file(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> None:
        await self._storage.delete_file(file_id, owner=owner)

    async def open_file_content(self, file_id: ids.FileId, *, owner: models.OwnerScope) -> AsyncIterator[bytes]:
        """The file's JSONL as a stream of chunks; `NotFound` is raised here, before any byte."""
        return await self._storage.open_file_content(file_id, owner=owner)

    # ----------------------------------------------------------------------------------------- models

    async def list_models(self, *, owner: models.OwnerScope) -> list[served.ListedModel]:
        """The models served to `owner`: every model with a route of its own, and with a default route, the models
        it serves that `owner`'s uploads named (`ALL_OWNERS`: every owner's; at most `served.SEEN_LISTED`, the most
        recently first seen)."""
        if self._served_models is None:
            return []
        routing = self._served_models()
        seen = await self._storage.list_models_seen(owner=owner) if routing.default_route else []
        return routing.listing(seen)

    async def get_model(self, model: str, *, owner: models.OwnerScope) -> served.ListedModel:
        """`model` as `list_models` shows it to `owner` (it may be older than the listing's bound); `NotFound`
        when it is not served to `owner`, whatever the name (too long, odd characters)."""
        routing = self._served_models() if self._served_models is not None else None
        found = None
        if routing is not None:
            seen = None
            if routing.to_default_route(model) and served.can_be_seen(model):
                recorded = await self._storage.list_models_seen(owner=owner, model=model, limit=1)
                seen = recorded[0] if recorded else None
            found = routing.find(model, seen)
        if found is None:
            raise errors.NotFound(f"The model {_quoted(model)} does not exist or you do not have access to it.")
        return found

    # ---------------------------------------------------------------------------------------- batches

    async def create_batch(self, spec: models.BatchSpec, *, retried: bool = False) -> models.Batch:
        """Create a batch (or return the one a retry of this create already made, see the module docstring),
        then wake the daemon. `retried`: the client says this request is a retry of an earlier attempt."""
        _check_spec(spec, self._limits)
        if spec.budget is not None:
            spec = dataclasses.replace(spec, prices=self._prices)  # storage fixes each model's pricing
        if spec.idempotency_key is not None:
            batch = await self._storage.create_batch(spec)
        else:
            batch = await self._create_once(spec, retried=retried)
        self._notify_work()
        return batch

    async def _create_once(self, spec: models.BatchSpec, *, retried: bool) -> models.Batch:
        fingerprint = _fingerprint(spec)
        if retried:
            running = self._creating.get(fingerprint)
            if running is not None:
                with contextlib.suppress(Exception):  # the first attempt failed: this one tries for itself
                    return await asyncio.shield(running)
            twin = await self._recent_twin(spec)
            if twin is not None:
                return twin
        creation = asyncio.ensure_future(self._storage.create_batch(spec))
        self._creating[fingerprint] = creation
        creation.add_done_callback(lambda done: self._forget(fingerprint, done))
        # Shielded: if the client goes away, the create still finishes, so that its retry can find it.
        return await asyncio.shield(creation)

    def _forget(self, fingerprint: _Fingerprint, creation: asyncio.Future[models.Batch]) -> None:
        if self._creating.get(fingerprint) is creation:
            del self._creating[fingerprint]
        if not creation.cancelled():
            creation.exception()  # retrieved here, so a failure whose caller left is not reported as lost

    async def _recent_twin(self, spec: models.BatchSpec) -> models.Batch | None:
        """The newest batch of the owner made from the same create parameters within `RETRY_WINDOW`."""
        cutoff = self._clock.now() - RETRY_WINDOW
        wanted = _fingerprint(spec)
        after: ids.BatchId | None = None
        while True:
            page = await self._storage.list_batches(owner=spec.owner, after=after, limit=_TWIN_PAGE)
            for batch in page.items:
                if batch.created_at < cutoff:
                    return None
                if _fingerprint_of(batch) == wanted:
                    return batch
            if not page.has_more or not page.items:
                return None
            after = page.items[-1].id

    async def get_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        return await self._storage.get_batch(batch_id, owner=owner)

    async def list_batches(
        self, *, owner: models.OwnerScope, after: ids.BatchId | None = None, limit: int = 20
    ) -> models.Page[models.Batch]:
        return await self._storage.list_batches(owner=owner, after=after, limit=limit)

    async def cancel_batch(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        """`StateConflict` if the batch already completed, failed or expired."""
        return await self._storage.cancel_batch(batch_id, owner=owner)

    async def retry_failed(self, batch_id: ids.BatchId, *, owner: models.OwnerScope) -> models.Batch:
        """Put the batch's failed requests back to pending and wake the daemon if any moved. Returns the batch as
        the retry left it, read in the retry's transaction (so no daemon can have finished the retried requests
        already: the caller sees them pending)."""
        retried = await self._storage.retry_failed(batch_id, owner=owner)
        if retried.moved:
            self._notify_work()
        return retried.batch

    async def list_requests(
        self,
        batch_id: ids.BatchId,
        *,
        owner: models.OwnerScope,
        state: states.RequestState | None = None,
        after: ids.RequestId | None = None,
        limit: int = 100,
    ) -> models.Page[models.Request]:
        return await self._storage.list_requests(batch_id, owner=owner, state=state, after=after, limit=limit)

    # ------------------------------------------------------------------------------------------ usage

    async def usage_report(
        self, *, owner: models.OwnerScope, since: date | None = None, by: usage_report.UsageGrouping
    ) -> usage_report.UsageReport:
        """The token usage of `owner`'s completed requests (`ALL_OWNERS`: of every owner, row by row) by model,
        day or batch, from the UTC day `since` on, each row priced at the pricing in force (`prices`)."""
        found = await self._storage.usage_report(owner=owner, since=since, by=by)
        return usage_report.priced(found, self._prices)


# ------------------------------------------------------------------------------------------- helpers


class SpilledIds:
    """The custom_ids of one file seen so far (`domain.seen_ids.SeenIds`): in a dict while there are at most
    `IN_MEMORY` (about 8 MB; files within the default `[uploads] max_lines` never leave it), then in a private
    temporary SQLite database (`sqlite3.connect("")`): held in a page cache of `CACHE_KIB`, the rest in an
    unlinked file in SQLite's temporary directory (`$SQLITE_TMPDIR`, else `$TMPDIR`, else `/var/tmp` or `/tmp`),
    the id's length plus about 12 bytes of disk an id (26 MB for a million ids of 15 characters), gone when it is
    closed. Memory then stays flat however long the file is. A look-up of many lines at once is one join and one
    insert, in SQLite's C code: 3 to 6 µs a line for a million lines (the more random the ids, the more),
    against half a microsecond in the dict."""

    IN_MEMORY: Final = 50_000
    CACHE_KIB: Final = 2048

    def __init__(self, *, in_memory: int | None = None) -> None:
        self._in_memory = self.IN_MEMORY if in_memory is None else in_memory
        """Most ids kept in the dict (default: `IN_MEMORY`)."""
        self._memory: dict[str, int] | None = {}
        self._database: sqlite3.Connection | None = None

    @property
    def batched(self) -> bool:
        return self._memory is None

    def first_lines(self, ids: Sequence[tuple[str, int]]) -> list[int]:
        memory = self._memory
        if memory is not None:
            firsts = [memory.setdefault(custom_id, line) for custom_id, line in ids]
            if len(memory) > self._in_memory:
                self._database = _scratch_ids(memory)
                self._memory = None
            return firsts
        assert self._database is not None
        database = self._database
        within: dict[str, int] = {}
        firsts = [within.setdefault(custom_id, line) for custom_id, line in ids]
        try:
            database.executemany("INSERT INTO batch (id, line) VALUES (?, ?)", within.items())
            before = dict(database.execute("SELECT id, seen.line FROM batch JOIN seen USING (id)").fetchall())
            database.execute("INSERT OR IGNORE INTO seen (id, line) SELECT id, line FROM batch")
            database.execute("DELETE FROM batch")
        except sqlite3.Error as exc:
            raise _scratch_failed(exc) from exc
        if before:
            firsts = [before.get(custom_id, first) for (custom_id, _), first in zip(ids, firsts, strict=True)]
        return firsts

    def close(self) -> None:
        self._memory = None
        if self._database is not None:
            self._database.close()
            self._database = None


def _scratch_ids(lines: Mapping[str, int]) -> sqlite3.Connection:
    """A temporary database holding `lines` (custom_id -> first line) in `seen`, and an empty `batch` table
    (the ids of one look-up), in a transaction never committed: nothing is written but what the cache spills."""
    try:
        database = sqlite3.connect("", isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _scratch_failed(exc) from exc
    try:
        database.execute("PRAGMA journal_mode = OFF")
        database.execute("PRAGMA synchronous = OFF")
        database.execute(f"PRAGMA cache_size = -{SpilledIds.CACHE_KIB}")
        database.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID")
        database.execute("CREATE TABLE batch (id TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID")
        database.execute("BEGIN")
        database.executemany("INSERT INTO seen (id, line) VALUES (?, ?)", sorted(lines.items()))
    except BaseException as exc:
        database.close()
        if isinstance(exc, sqlite3.Error):
            raise _scratch_failed(exc) from exc
        raise
    return database


def _scratch_failed(exc: sqlite3.Error) -> errors.StorageUnavailable:
    return errors.StorageUnavailable(
        f"The temporary database that checks the custom_ids of a large file failed ({exc}); make room in the "
        "temporary directory ($SQLITE_TMPDIR, else $TMPDIR, else /var/tmp or /tmp) and try again."
    )


async def _spool(chunks: AsyncIterable[bytes], spool: IO[bytes], max_bytes: int) -> int:
    """Copy `chunks` to `spool`, gathering them into writes of `SPOOL_WRITE_BYTES`; return the size. Raises as
    soon as the size passes `max_bytes`."""
    size = 0
    pending: list[bytes] = []
    pending_size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise file_too_large(max_bytes)
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= SPOOL_WRITE_BYTES:
            await asyncio.to_thread(spool.writelines, pending)
            pending, pending_size = [], 0
    if pending:
        await asyncio.to_thread(spool.writelines, pending)
    return size


async def _read(handle: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(handle.read, READ_CHUNK_BYTES):
        yield chunk


def file_too_large(max_bytes: int) -> InvalidParameter:
    """The refusal of an upload larger than `max_bytes` (param `file`, line 0)."""
    size = f"{max_bytes:,} bytes" + (f" ({max_bytes // 2**20} MiB)" if max_bytes % 2**20 == 0 else "")
    reason = f"The file is larger than {size}, the limit; split it into smaller files."
    return InvalidParameter(
        "file",
        f"The file is larger than {size}, the limit; nothing was stored.",
        errors=[errors.LineError(0, reason)],
    )


def _quoted(text: str, limit: int = 60) -> str:
    """`text` quoted for a message, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _clean_filename(filename: str) -> str:
    """The name as shown in listings: the last path component, without control characters, length-capped."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(character for character in name if character.isprintable())
    return name[:MAX_FILENAME_LENGTH] or DEFAULT_FILENAME


def _check_spec(spec: models.BatchSpec, limits: jsonl.Limits) -> None:
    if spec.endpoint not in limits.allowed_urls:
        supported = ", ".join(sorted(limits.allowed_urls))
        raise InvalidParameter("endpoint", f"endpoint {spec.endpoint!r} is not supported; use one of {supported}.")
    try:
        models.parse_completion_window(spec.completion_window)
    except errors.ValidationError as exc:
        raise InvalidParameter("completion_window", exc.message) from exc
    if spec.metadata is not None:
        _check_metadata(spec.metadata)
    key = spec.idempotency_key
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidParameter(
            "Idempotency-Key", f"The Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters long."
        )
    if key is not None and (problem := _text_problem(key)):
        raise InvalidParameter("Idempotency-Key", f"The Idempotency-Key contains {problem}.")


def _check_metadata(metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidParameter(
            "metadata", f"metadata has {len(metadata)} keys; at most {MAX_METADATA_PAIRS} are allowed."
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_LENGTH:
            raise InvalidParameter(
                "metadata", f"metadata key {key[:20]!r}… is longer than {MAX_METADATA_KEY_LENGTH} characters."
            )
        if len(value) > MAX_METADATA_VALUE_LENGTH:
            raise InvalidParameter(
                "metadata", f"metadata value of {key!r} is longer than {MAX_METADATA_VALUE_LENGTH} characters."
            )
        for text in (key, value):
            if problem := _text_problem(text):  # PostgreSQL cannot store these; refused on SQLite too, alike
                raise InvalidParameter("metadata", f"metadata pair {key[:20]!r} contains {problem}.")


def _text_problem(text: str) -> str | None:
    """Why `text` cannot be stored as text (in PostgreSQL as in SQLite), or None: a NUL character, or a lone
    surrogate (a JSON escape such as `\\ud800` that no character follows up)."""
    if "\x00" in text:
        return "a NUL character (\\u0000)"
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"a lone surrogate ({text[exc.start]!r}), which is not a character: use valid Unicode text"
    return None


def _frozen_metadata(metadata: Mapping[str, str] | None) -> frozenset[tuple[str, str]] | None:
    return frozenset(metadata.items()) if metadata else None


def _fingerprint(spec: models.BatchSpec) -> _Fingerprint:
    return (
        spec.owner,
        spec.input_file_id,
        spec.endpoint,
        spec.completion_window,
        _frozen_metadata(spec.metadata),
        _budget_limits(spec.budget),
    )


def _fingerprint_of(batch: models.Batch) -> _Fingerprint:
    return (
        batch.owner,
        batch.input_file_id,
        batch.endpoint,
        batch.completion_window,
        _frozen_metadata(batch.metadata),
        _budget_limits(batch.budget),
    )


def _budget_limits(budget: models.Budget | None) -> tuple[object, ...] | None:
    return None if budget is None else (budget.max_total_tokens, budget.max_cost)
