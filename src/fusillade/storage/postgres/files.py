"""Files and request templates: upload in chunks, lookups, listings, soft delete, content pages."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Sequence
from datetime import UTC, datetime

import asyncpg

from fusillade.domain import ids, lines, models, states
from fusillade.storage import base, refusals
from fusillade.storage.postgres import rows
from fusillade.storage.postgres.connection import Connection

TEMPLATE_CHUNK_ROWS = 2000
"""Templates per INSERT while uploading (a few MB of parameters at most)."""

CONTENT_PAGE_ROWS = 1000
"""Rows per database read while streaming a file's content."""

_INSERT_TEMPLATES = """
INSERT INTO request_templates (id, file_id, line_number, custom_id, custom_id_bytes, method, url, model, body)
SELECT ordered_uuid(s.head, s.start + t.line_number), $1, t.line_number, t.custom_id, t.custom_id_bytes, t.method,
       t.url, t.model, t.body
FROM unnest($2::integer[], $3::text[], $4::integer[], $5::text[], $6::text[], $7::text[], $8::text[])
    AS t(line_number, custom_id, custom_id_bytes, method, url, model, body)
CROSS JOIN ordered_uuid_seed() AS s
"""

_INSERT_FILE = """
INSERT INTO files (id, owner, filename, purpose, size_bytes, request_count, created_at, expires_at)
VALUES ($1, $2, $3, 'batch', $4, $5, $6, $7)
"""

_SELECT_FILE = f"""
SELECT {rows.FILE_COLUMNS}
FROM {rows.FILE_SOURCE}
WHERE f.id = $1 AND f.deleted_at IS NULL AND ($2::text IS NULL OR f.owner = $2) AND {rows.FILE_VISIBLE}
"""

_SELECT_CURSOR = """
SELECT created_at, id FROM files
WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR owner = $2)
"""

_LIST_FILES = f"""
SELECT {rows.FILE_COLUMNS}
FROM {rows.FILE_SOURCE}
WHERE f.deleted_at IS NULL
  AND {rows.FILE_VISIBLE}
  AND ($1::text IS NULL OR f.owner = $1)
  AND ($2::text IS NULL OR f.purpose = $2)
  AND ($3::timestamptz IS NULL OR (f.created_at, f.id) COMPARISON ($3, $4::uuid))
ORDER BY f.created_at DIRECTION, f.id DIRECTION
LIMIT $5
"""
_LIST_FILES_ASC = _LIST_FILES.replace("COMPARISON", ">").replace("DIRECTION", "ASC")
_LIST_FILES_DESC = _LIST_FILES.replace("COMPARISON", "<").replace("DIRECTION", "DESC")

_DELETE_FILE = """
UPDATE files SET deleted_at = $3
WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR owner = $2)
RETURNING id
"""

_INPUT_PAGE = f"""
SELECT {rows.TEMPLATE_COLUMNS}
FROM request_templates t
WHERE t.file_id = $1 AND t.line_number > $2
ORDER BY t.line_number
LIMIT $3
"""

_RESULT_PAGE = f"""
SELECT {rows.REQUEST_COLUMNS}
FROM requests r
WHERE r.batch_id = $1 AND r.state = ANY($2::text[]) AND (r.finished_at, r.id) > ($3, $4)
ORDER BY r.finished_at, r.id
LIMIT $5
"""

# The output file's lines need only these columns: each line is formatted as read, no request object per line.
_OUTPUT_PAGE = """
SELECT r.id, r.custom_id, r.response_status, r.response_body, r.finished_at
FROM requests r
WHERE r.batch_id = $1 AND r.state = 'completed' AND (r.finished_at, r.id) > ($2, $3)
ORDER BY r.finished_at, r.id
LIMIT $4
"""

_RESULT_STATES = {
    states.FilePurpose.BATCH_OUTPUT: [states.RequestState.COMPLETED.value],
    states.FilePurpose.BATCH_ERROR: [states.RequestState.FAILED.value, states.RequestState.CANCELED.value],
}
_BEGINNING = (datetime(1, 1, 1, tzinfo=UTC), uuid.UUID(int=0))


class TemplateSourceError(Exception):
    """Carries an exception raised by the caller's template iterable through the transaction, so that it is
    neither translated nor confused with a database error; the store re-raises `original`."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


async def template_chunks(
    templates: AsyncIterable[models.TemplateInput] | Iterable[models.TemplateInput],
    size: int,
    max_bytes: int = base.TEMPLATE_CHUNK_BYTES,
) -> AsyncGenerator[list[models.TemplateInput], None]:
    """The templates in lists of at most `size`, each ended once its bodies reach `max_bytes`; a failure of the
    source is wrapped in `TemplateSourceError`."""
    chunk: list[models.TemplateInput] = []
    chunk_bytes = 0
    if isinstance(templates, AsyncIterable):
        iterator = aiter(templates)
        while True:
            try:
                template = await anext(iterator)
            except StopAsyncIteration:
                break
            except BaseException as exc:
                raise TemplateSourceError(exc) from None
            chunk.append(template)
            chunk_bytes += len(template.body)
            if len(chunk) >= size or chunk_bytes >= max_bytes:
                yield chunk
                chunk, chunk_bytes = [], 0
    else:
        sync_iterator = iter(templates)
        while True:
            try:
                template = next(sync_iterator)
            except StopIteration:
                break
            except BaseException as exc:
                raise TemplateSourceError(exc) from None
            chunk.append(template)
            chunk_bytes += len(template.body)
            if len(chunk) >= size or chunk_bytes >= max_bytes:
                yield chunk
                chunk, chunk_bytes = [], 0
    if chunk:
        yield chunk


async def insert_templates(
    connection: Connection, file_id: ids.FileId, chunk: Sequence[models.TemplateInput]
) -> None:
    await connection.execute(
        _INSERT_TEMPLATES,
        file_id,
        [template.line_number for template in chunk],
        [template.custom_id for template in chunk],
        [lines.custom_id_json_bytes(template.custom_id) for template in chunk],
        [template.method for template in chunk],
        [template.url for template in chunk],
        [template.model for template in chunk],
        [template.body for template in chunk],
    )


async def insert_file(connection: Connection, file: models.File) -> None:
    await connection.execute(
        _INSERT_FILE,
        file.id,
        file.owner,
        file.filename,
        file.bytes,
        file.request_count,
        file.created_at,
        file.expires_at,
    )


async def fetch_file(connection: Connection, file_id: ids.FileId, owner: models.OwnerScope) -> models.File:
    row = await connection.fetchrow(_SELECT_FILE, file_id, rows.owner_parameter(owner))
    if row is None:
        raise refusals.no_file(file_id)
    return rows.file_from_row(row)


async def list_files(
    connection: Connection,
    *,
    owner: models.OwnerScope,
    purpose: states.FilePurpose | None,
    after: ids.FileId | None,
    limit: int,
    order: base.SortOrder,
) -> models.Page[models.File]:
    owner_value = rows.owner_parameter(owner)
    cursor: asyncpg.Record | None = None
    if after is not None:
        cursor = await connection.fetchrow(_SELECT_CURSOR, after, owner_value)
        if cursor is None:
            raise refusals.no_file(after)
    found = await connection.fetch(
        _LIST_FILES_ASC if order == "asc" else _LIST_FILES_DESC,
        owner_value,
        None if purpose is None else purpose.value,
        None if cursor is None else cursor["created_at"],
        None if cursor is None else cursor["id"],
        max(limit, 0) + 1,
    )
    items = [rows.file_from_row(row) for row in found[: max(limit, 0)]]
    return models.Page(items=items, has_more=len(found) > max(limit, 0))


async def delete_file(
    connection: Connection, file_id: ids.FileId, owner: models.OwnerScope, now: datetime
) -> None:
    await fetch_file(connection, file_id, owner)  # NotFound for a result file without lines, as for a read
    deleted = await connection.fetchval(_DELETE_FILE, file_id, rows.owner_parameter(owner), now)
    if deleted is None:
        raise refusals.no_file(file_id)


async def input_page(connection: Connection, file_id: ids.FileId, after_line: int) -> list[models.RequestTemplate]:
    found = await connection.fetch(_INPUT_PAGE, file_id, after_line, CONTENT_PAGE_ROWS)
    return [rows.template_from_row(row) for row in found]


OutputCursor = tuple[datetime, uuid.UUID]
"""Where a page of results ended: (finished_at, request id)."""


async def output_page(
    connection: Connection, batch_id: ids.BatchId, after: OutputCursor | None
) -> tuple[bytes, int, OutputCursor | None]:
    """A page of the batch's output file: its lines, how many, and where it ended (None: empty page)."""
    finished_at, request_id = after or _BEGINNING
    found = await connection.fetch(_OUTPUT_PAGE, batch_id, finished_at, request_id, CONTENT_PAGE_ROWS)
    chunk = b"".join(lines.response_line(row[0].hex, row[1], row[2], row[3]) for row in found)
    return chunk, len(found), ((found[-1][4], found[-1][0]) if found else None)


async def result_page(
    connection: Connection,
    batch_id: ids.BatchId,
    purpose: states.FilePurpose,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[models.Request]:
    finished_at, request_id = after or _BEGINNING
    found = await connection.fetch(
        _RESULT_PAGE, batch_id, _RESULT_STATES[purpose], finished_at, request_id, CONTENT_PAGE_ROWS
    )
    return [rows.request_from_row(row) for row in found]
