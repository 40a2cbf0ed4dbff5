"""Files on SQLite: input files with their request templates, and the virtual output and error files of batches
(measured and rendered from the batch's requests)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from fusillade import errors
from fusillade.domain import ids, lines, models, states
from fusillade.storage import refusals
from fusillade.storage.sqlite import connection as connections
from fusillade.storage.sqlite import rows

PAGE_ROWS: Final = 1000
"""Rows read per page when streaming file content."""

INSERT_TEMPLATE = """
INSERT INTO request_templates (id, file_id, line_number, custom_id, custom_id_bytes, method, url, model, body)
VALUES (new_uuid(), ?, ?, ?, ?, ?, ?, ?, ?)
"""
INSERT_FILE = f"INSERT INTO files ({rows.FILE_COLUMNS}) VALUES ({', '.join('?' * len(rows.FileRow._fields))})"
SELECT_FILE = f"SELECT {rows.FILE_COLUMNS} FROM files WHERE id = ? AND deleted_at IS NULL"
# `state NOT IN ('claimed', 'processing')` lets SQLite use the partial index `requests_settled`.
_SETTLED = "state NOT IN ('claimed', 'processing')"
MEASURE_OUTPUT = f"""
SELECT COALESCE(SUM(result_bytes), 0), COUNT(*) FROM requests
WHERE batch_id = ? AND state = 'completed' AND {_SETTLED}
"""
MEASURE_ERRORS = f"""
SELECT COALESCE(SUM(result_bytes), 0), COUNT(*) FROM requests
WHERE batch_id = ? AND state IN ('failed', 'canceled') AND {_SETTLED}
"""
DELETE_FILE = "UPDATE files SET deleted_at = ? WHERE id = ?"
# A batch's output or error file exists for its owner once it has a line (as on OpenAI, where `output_file_id`
# and `error_file_id` stay null until then): an empty one is neither listed nor found.
# One EXISTS per state, so that each is one seek in `requests_settled` (batch_id, state, ...).
_HAS = (
    "EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = files.batch_id AND r.state = '{}' AND r." + _SETTLED + ")"
)
_HAS_LINES = (
    f"(purpose = 'batch_output' AND {_HAS.format('completed')}) "
    f"OR (purpose = 'batch_error' AND ({_HAS.format('failed')} OR {_HAS.format('canceled')}))"
)
VISIBLE = f"(purpose = 'batch' OR {_HAS_LINES})"
SELECT_VISIBLE = f"SELECT {VISIBLE} FROM files WHERE id = ?"

SELECT_TEMPLATES_PAGE = f"""
SELECT {rows.TEMPLATE_COLUMNS} FROM request_templates
WHERE file_id = ? AND line_number > ? ORDER BY line_number LIMIT {PAGE_ROWS}
"""
SELECT_OUTPUT_PAGE = f"""
SELECT id, custom_id, response_status, response_body, finished_at FROM requests
WHERE batch_id = ? AND state = 'completed' AND {_SETTLED} AND (finished_at, id) > (?, ?)
ORDER BY finished_at, id LIMIT {PAGE_ROWS}
"""
SELECT_ERRORS_PAGE = f"""
SELECT {rows.REQUEST_COLUMNS} FROM requests
WHERE batch_id = ?1 AND state = 'failed' AND {_SETTLED} AND (finished_at, id) > (?2, ?3)
UNION ALL
SELECT {rows.REQUEST_COLUMNS} FROM requests
WHERE batch_id = ?1 AND state = 'canceled' AND {_SETTLED} AND (finished_at, id) > (?2, ?3)
ORDER BY finished_at, id LIMIT {PAGE_ROWS}
"""

_ORDER_WORDS: Final = {"asc": ("ASC", ">"), "desc": ("DESC", "<")}


# -------------------------------------------------------------------------------------------- creation


def template_rows(file_id: ids.FileId, chunk: Sequence[models.TemplateInput]) -> list[tuple[Any, ...]]:
    """Parameters of `INSERT_TEMPLATE` for a chunk (computed outside the writer thread)."""
    file_bytes = file_id.bytes
    return [
        (
            file_bytes,
            item.line_number,
            item.custom_id,
            lines.custom_id_json_bytes(item.custom_id),
            item.method,
            item.url,
            item.model,
            item.body,
        )
        for item in chunk
    ]


def insert_templates(connection: sqlite3.Connection, now: datetime, templates: list[tuple[Any, ...]]) -> None:
    connection.executemany(INSERT_TEMPLATE, templates)


def insert_input_file(
    connection: sqlite3.Connection,
    now: datetime,
    *,
    file_id: ids.FileId,
    owner: str,
    filename: str,
    size_bytes: int,
    request_count: int,
    expires_at: datetime | None,
) -> models.File:
    row = rows.FileRow(
        id=file_id.bytes,
        owner=owner,
        filename=filename,
        purpose=states.FilePurpose.BATCH.value,
        size_bytes=size_bytes,
        request_count=request_count,
        batch_id=None,
        created_at=connections.to_micros(now),
        expires_at=connections.to_micros_or_none(expires_at),
        deleted_at=None,
    )
    connection.execute(INSERT_FILE, row)
    return rows.file_from_row(row)


def insert_virtual_files(
    connection: sqlite3.Connection, *, batch_id: ids.BatchId, owner: str, created_at: int
) -> tuple[ids.FileId, ids.FileId]:
    """The output and error files of a new batch; returns their ids."""
    return (
        _insert_virtual_file(connection, batch_id, owner, states.FilePurpose.BATCH_OUTPUT, created_at),
        _insert_virtual_file(connection, batch_id, owner, states.FilePurpose.BATCH_ERROR, created_at),
    )


def _insert_virtual_file(
    connection: sqlite3.Connection, batch_id: ids.BatchId, owner: str, purpose: states.FilePurpose, created_at: int
) -> ids.FileId:
    file_id = ids.new_file_id()
    suffix = "output" if purpose is states.FilePurpose.BATCH_OUTPUT else "error"
    row = rows.FileRow(
        id=file_id.bytes,
        owner=owner,
        filename=f"batch_{batch_id.hex}_{suffix}.jsonl",
        purpose=purpose.value,
        size_bytes=0,
        request_count=0,
        batch_id=batch_id.bytes,
        created_at=created_at,
        expires_at=None,
        deleted_at=None,
    )
    connection.execute(INSERT_FILE, row)
    return file_id


_RESULT_FILE_COLUMNS: Final = {
    states.FilePurpose.BATCH_OUTPUT: "output_file_id",
    states.FilePurpose.BATCH_ERROR: "error_file_id",
}
SELECT_DELETED_RESULT_FILES = "SELECT purpose FROM files WHERE id IN (?, ?) AND deleted_at IS NOT NULL"


def replace_deleted_result_files(connection: sqlite3.Connection, now: datetime, batch: rows.BatchRow) -> None:
    """Give `batch` a new (empty) output or error file in place of one its owner deleted, so that the results
    of requests it runs again are reachable; the deleted file stays deleted."""
    deleted = connection.execute(SELECT_DELETED_RESULT_FILES, (batch.output_file_id, batch.error_file_id))
    for (purpose,) in deleted.fetchall():
        kind = states.FilePurpose(purpose)
        batch_id = ids.BatchId(connections.to_uuid(batch.id))
        new_id = _insert_virtual_file(connection, batch_id, batch.owner, kind, connections.to_micros(now))
        connection.execute(
            f"UPDATE batches SET {_RESULT_FILE_COLUMNS[kind]} = ? WHERE id = ?", (new_id.bytes, batch.id)
        )


# ------------------------------------------------------------------------------------------------ reads


def visible_file_row(
    connection: sqlite3.Connection, file_id: ids.FileId, owner: models.OwnerScope
) -> rows.FileRow:
    """The file's row, or `NotFound` if it is missing, deleted, another owner's, or a result file without
    lines yet."""
    row = _file_row(connection, file_id, owner)
    if not row.is_input and not connection.execute(SELECT_VISIBLE, (row.id,)).fetchone()[0]:
        raise _not_found(file_id)
    return row


def _file_row(connection: sqlite3.Connection, file_id: ids.FileId, owner: models.OwnerScope) -> rows.FileRow:
    found = connection.execute(SELECT_FILE, (file_id.bytes,)).fetchone()
    if found is None or not rows.owner_matches(found[1], owner):
        raise _not_found(file_id)
    return rows.FileRow._make(found)


def _not_found(file_id: ids.FileId) -> errors.NotFound:
    return refusals.no_file(file_id)


def file_from_row(connection: sqlite3.Connection, row: rows.FileRow) -> models.File:
    """The file of a row, measuring an output or error file from its batch's requests."""
    if row.is_input:
        return rows.file_from_row(row)
    measure = MEASURE_OUTPUT if row.purpose == states.FilePurpose.BATCH_OUTPUT.value else MEASURE_ERRORS
    size, count = connection.execute(measure, (row.batch_id,)).fetchone()
    return rows.file_from_row(row, size=size, count=count)


def get_file(connection: sqlite3.Connection, file_id: ids.FileId, owner: models.OwnerScope) -> models.File:
    return file_from_row(connection, visible_file_row(connection, file_id, owner))


def list_files(
    connection: sqlite3.Connection,
    *,
    owner: models.OwnerScope,
    purpose: states.FilePurpose | None,
    after: ids.FileId | None,
    limit: int,
    order: str,
) -> models.Page[models.File]:
    direction, comparison = _ORDER_WORDS[order]
    conditions = ["deleted_at IS NULL", VISIBLE]
    parameters: list[Any] = []
    if owner is not models.ALL_OWNERS:
        conditions.append("owner = ?")
        parameters.append(owner)
    if purpose is not None:
        conditions.append("purpose = ?")
        parameters.append(purpose.value)
    if after is not None:
        cursor = _file_row(connection, after, owner)  # a page may end on a file that has since emptied
        conditions.append(f"(created_at, id) {comparison} (?, ?)")
        parameters.extend((cursor.created_at, cursor.id))
    sql = (
        f"SELECT {rows.FILE_COLUMNS} FROM files WHERE {' AND '.join(conditions)} "
        f"ORDER BY created_at {direction}, id {direction} LIMIT ?"
    )
    parameters.append(max(limit, 0) + 1)
    found = [rows.FileRow._make(row) for row in connection.execute(sql, parameters)]
    items = [file_from_row(connection, row) for row in found[:limit]]
    return models.Page(items=items, has_more=len(found) > limit)


def delete_file(
    connection: sqlite3.Connection, now: datetime, file_id: ids.FileId, owner: models.OwnerScope
) -> None:
    visible_file_row(connection, file_id, owner)
    connection.execute(DELETE_FILE, (connections.to_micros(now), file_id.bytes))


# ---------------------------------------------------------------------------------------------- content


@dataclass(frozen=True, slots=True)
class ContentSource:
    """What to stream for a file: its templates (input) or its batch's results (output or error)."""

    purpose: states.FilePurpose
    key: bytes
    """The file id (input) or the batch id (output and error)."""


def content_source(connection: sqlite3.Connection, file_id: ids.FileId, owner: models.OwnerScope) -> ContentSource:
    row = visible_file_row(connection, file_id, owner)
    if row.is_input or row.batch_id is None:
        return ContentSource(states.FilePurpose.BATCH, row.id)
    return ContentSource(states.FilePurpose(row.purpose), row.batch_id)


Cursor = tuple[int, bytes]
"""Where the previous page ended: line number (input) or (finished_at, request id) (results)."""


def content_page(
    connection: sqlite3.Connection, source: ContentSource, cursor: Cursor
) -> tuple[bytes, Cursor | None]:
    """One page of content after `cursor`: its bytes, and the cursor of the next page (None at the end)."""
    if source.purpose is states.FilePurpose.BATCH:
        templates = [
            rows.TemplateRow._make(row)
            for row in connection.execute(SELECT_TEMPLATES_PAGE, (source.key, cursor[0]))
        ]
        chunk = b"".join(lines.input_line(rows.template_from_row(row)) for row in templates)
        count = len(templates)
        next_cursor: Cursor = (templates[-1].line_number, b"") if templates else cursor
    elif source.purpose is states.FilePurpose.BATCH_OUTPUT:
        # Only the columns of the line, formatted as read: no request object per line.
        found = connection.execute(SELECT_OUTPUT_PAGE, (source.key, *cursor)).fetchall()
        chunk = b"".join(
            lines.response_line(key.hex(), custom_id, status, body) for key, custom_id, status, body, _ in found
        )
        count = len(found)
        next_cursor = (found[-1][4] or 0, found[-1][0]) if found else cursor
    else:
        results = [
            rows.RequestRow._make(row) for row in connection.execute(SELECT_ERRORS_PAGE, (source.key, *cursor))
        ]
        chunk = b"".join(lines.result_line(rows.request_from_row(row)) for row in results)
        count = len(results)
        last = results[-1] if results else None
        next_cursor = (last.finished_at or 0, last.id) if last is not None else cursor
    return chunk, (next_cursor if count == PAGE_ROWS else None)


FIRST_CURSOR: Final[Cursor] = (-(2**62), b"")
