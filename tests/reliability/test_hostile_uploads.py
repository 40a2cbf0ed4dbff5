"""Scenario 6, hostile input, uploads over the real HTTP API on SQLite and PostgreSQL (the rows counted in the
database itself):

- JSONL uploads (property): the hostile files of `hostile_input.hostile_files`. A file with any bad line is a 400
  naming exactly its bad lines, and the database holds no new file row and no new template; a file without one
  is stored whole.
- Multipart framing (property): cut, doubled, garbled forms are a 400 storing nothing, or, when the form is still
  whole, a 200 storing the whole file.
- Explicit refusals, each a 400 with the error envelope (and the line number where there is one).

Covered elsewhere and not repeated here (tests/e2e/test_api.py): an oversized file of many lines
(`test_an_oversized_upload_is_refused_with_a_clear_message`), non-UTF-8 bytes in a line
(`test_a_file_that_is_not_utf8_is_refused_with_its_line_numbers`), a multipart without a file part, without
`purpose` or not multipart at all (`test_malformed_upload_forms_are_refused`), a model without a route and a
line that is a JSON array (`test_a_bad_file_lists_every_bad_line`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusillade.domain import ids, models
from fusillade.storage import base
from tests.reliability.hostile_input import (
    CHAT,
    LIMITS,
    HostileFile,
    deep,
    deep_line,
    examples,
    hostile_files,
    request_line,
)
from tests.support import backends, factories
from tests.support.api_server import RunningApi, create_key, running_api

pytestmark = pytest.mark.reliability

# ----------------------------------------------------------------------------- uploads over HTTP, stored


class Rows:
    """Counts of the rows an upload writes, read straight from the database (not through the storage)."""

    def __init__(self, backend: backends.Backend) -> None:
        self.backend = backend
        self._postgres: asyncpg.Connection | None = None

    async def count(self) -> tuple[int, int]:
        """(files, request templates)."""
        query = "SELECT (SELECT count(*) FROM files), (SELECT count(*) FROM request_templates)"
        if self.backend.is_postgres:
            if self._postgres is None:
                self._postgres = await asyncpg.connect(self.backend.location)
            row = await self._postgres.fetchrow(query)
            assert row is not None
            return int(row[0]), int(row[1])
        with contextlib.closing(sqlite3.connect(self.backend.location)) as connection:
            files, templates = connection.execute(query).fetchone()
        return int(files), int(templates)

    async def close(self) -> None:
        if self._postgres is not None:
            await self._postgres.close()


@dataclass
class Uploader:
    api: RunningApi
    http: aiohttp.ClientSession
    key: str
    rows: Rows

    async def post(self, path: str, **options: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}", **options.pop("headers", {})}
        async with self.http.post(self.api.url + path, headers=headers, **options) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if response.content_type == "application/json" else raw

    async def upload(self, content: bytes, filename: str = "input.jsonl") -> tuple[int, Any]:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=filename, content_type="application/jsonl")
        return await self.post("/v1/files", data=form)


@pytest.fixture
async def uploader(backend: backends.Backend, storage: base.Storage, tmp_path: Path) -> AsyncIterator[Uploader]:
    spool = tmp_path / "spool"
    spool.mkdir()
    rows = Rows(backend)
    async with aiohttp.ClientSession() as http, running_api(storage, limits=LIMITS, spool_directory=spool) as api:
        try:
            yield Uploader(api, http, await create_key(storage, "mallory"), rows)
        finally:
            await rows.close()
    assert list(spool.iterdir()) == [], "every spooled upload was removed"


def assert_envelope(body: Any, *, code: str, param: str | None) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), error
    assert error["message"]
    return error


@examples(30)
@given(file=hostile_files())
async def test_a_hostile_upload_is_refused_whole_or_stored_whole(uploader: Uploader, file: HostileFile) -> None:
    before = await uploader.rows.count()

    status, body = await uploader.upload(file.data)

    after = await uploader.rows.count()
    if file.bad_lines:
        assert status == 400, (file.kinds, body)
        error = assert_envelope(body, code="invalid_file", param="file")
        assert [item["line"] for item in error["lines"]] == list(file.bad_lines), (file.kinds, error)
        assert after == before, f"a refused upload stored rows: {before} -> {after} ({file.kinds})"
    else:
        assert status == 200, body
        assert after == (before[0] + 1, before[1] + file.requests)


MULTIPART_MUTATIONS = [
    "intact",
    "truncated",
    "no_closing_boundary",
    "second_file_part",
    "garbage_inserted",
    "wrong_boundary",
    "part_without_name",
    "purpose_too_long",
    "purpose_not_batch",
    "headers_cut",
]


def multipart(boundary: bytes, parts: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A multipart/form-data body of (Content-Disposition value, content) parts."""
    body = b""
    for disposition, content in parts:
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


@st.composite
def hostile_forms(draw: st.DrawFn) -> tuple[str, bytes, bytes, int]:
    """(mutation, Content-Type boundary, body, requests in the file)."""
    boundary = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789'()+_,-.", min_size=8, max_size=40)).encode()
    count = draw(st.integers(1, 4))
    content = b"".join(request_line(f"form-{n}") + b"\n" for n in range(count))
    file_part = (b'form-data; name="file"; filename="in.jsonl"', content)
    purpose = (b'form-data; name="purpose"', b"batch")
    parts = [purpose, file_part] if draw(st.booleans()) else [file_part, purpose]
    mutation = draw(st.sampled_from(MULTIPART_MUTATIONS))
    if mutation == "second_file_part":
        parts.append(file_part)
    elif mutation == "part_without_name":
        parts.insert(draw(st.integers(0, len(parts))), (b"form-data", b"x"))
    elif mutation == "purpose_too_long":
        parts = [(purpose[0], b"batch" * 14_000), file_part]
    elif mutation == "purpose_not_batch":
        parts = [file_part, (purpose[0], draw(st.sampled_from([b"fine-tune", b"", b"batch\x00", b"\xff"])))]
    body = multipart(boundary, parts)
    sent_boundary = boundary
    if mutation == "truncated":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif mutation == "no_closing_boundary":
        body = body[: body.rindex(b"--" + boundary + b"--")]
    elif mutation == "garbage_inserted":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=30)) + body[at:]
    elif mutation == "wrong_boundary":
        sent_boundary = boundary + b"x"
    elif mutation == "headers_cut":
        body = body.replace(b"\r\n\r\n", b"\r\n", 1)
    return mutation, sent_boundary, body, count


@examples(25)
@given(form=hostile_forms())
async def test_a_broken_multipart_form_is_refused_whole_or_stored_whole(
    uploader: Uploader, form: tuple[str, bytes, bytes, int]
) -> None:
    mutation, boundary, body, requests = form
    before = await uploader.rows.count()

    status, answer = await uploader.post(
        "/v1/files",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()},
    )

    after = await uploader.rows.count()
    assert status in (200, 400), (mutation, status, answer)
    if status == 400:
        assert answer["error"]["param"] in ("file", "purpose"), answer
        assert_envelope(answer, code=answer["error"]["code"], param=answer["error"]["param"])
        assert after == before, f"a refused form stored rows: {before} -> {after} ({mutation})"
    else:
        assert after == (before[0] + 1, before[1] + requests), "an accepted form stores the whole file"
    if mutation == "intact":
        assert status == 200, answer
    if mutation in ("second_file_part", "wrong_boundary", "purpose_too_long", "purpose_not_batch"):
        assert status == 400, (mutation, answer)


# ------------------------------------------------------------------------------- explicit refusals (HTTP)


async def test_each_hostile_upload_is_a_clear_400_with_its_line(uploader: Uploader) -> None:
    ok = request_line("ok-1") + b"\n"
    cases: list[tuple[str, bytes, list[int], str]] = [
        ("one line over the size limit", b'{"custom_id": "' + b"x" * (LIMITS.max_bytes + 10), [0], "larger than"),
        ("custom_id over its limit", ok + request_line("y" * 65) + b"\n", [2], "65 characters long"),
        ("empty file part", b"", [0], "no requests"),
        ("UTF-16 file", (ok.decode() + ok.decode()).encode("utf-16"), [1], "UTF-8"),
        ("custom_id with a newline", ok + request_line("two\nlines") + b"\n", [2], "control character '\\n'"),
        ("custom_id with a raw newline", ok + request_line("two@@lines").replace(b"@@", b"\n"), [2, 3], "JSON"),
        ("duplicate custom_id", ok + request_line("ok-2") + b"\n" + ok, [3], "used again (first on line 1)"),
        ("NUL in custom_id", ok + request_line("nul\x00") + b"\n", [2], "control character '\\x00'"),
        ("NUL in model", ok + request_line("m", model="model-a\x00") + b"\n", [2], "body.model"),
        ("body nested too deeply", ok + deep_line("deep", 300), [2], "nested too deeply"),
    ]  # fmt: skip
    before = await uploader.rows.count()
    for name, content, lines, phrase in cases:
        status, body = await uploader.upload(content)
        assert status == 400, (name, body)
        error = assert_envelope(body, code="invalid_file", param="file")
        assert [item["line"] for item in error["lines"]][: len(lines)] == lines, (name, error["lines"])
        assert phrase in error["lines"][0]["message"] or phrase in error["message"], (name, error)
    assert await uploader.rows.count() == before, "nothing of a refused upload is stored"
    status, body = await uploader.upload(ok)
    assert status == 200, "the connection and the API still work after the refusals"


async def test_a_nul_in_batch_metadata_is_a_400_not_a_database_error(uploader: Uploader) -> None:
    status, uploaded = await uploader.upload(request_line("m-1") + b"\n")
    assert status == 200
    payload = {"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h"}

    for metadata in ({"team": "a\x00b"}, {"nul\x00key": "x"}):
        status, body = await uploader.post("/v1/batches", json=payload | {"metadata": metadata})
        assert status == 400, (metadata, body)
        assert_envelope(body, code="invalid_value", param="metadata")
    status, body = await uploader.post("/v1/batches", json=payload | {"metadata": {"team": "a\nb"}})
    assert status == 200, "other control characters are stored (metadata is JSON), only NUL is refused"


async def test_a_deeply_nested_upstream_answer_can_still_be_listed(uploader: Uploader) -> None:
    storage = uploader.api.storage
    batch = await factories.create_batch(storage, owner="mallory", count=2)
    daemon_id = await factories.register(storage)
    claimed = await factories.claim(storage, daemon_id, 2)
    await factories.start(storage, daemon_id, [request.id for request in claimed])
    too_deep = '{"x":' + deep(400) + "}"
    await factories.apply(storage, daemon_id, *(models.Complete(request.id, 200, too_deep) for request in claimed))

    async with uploader.http.get(
        f"{uploader.api.url}/v1/batches/{ids.batch_wire(batch.id)}/requests",
        headers={"Authorization": f"Bearer {uploader.key}"},
    ) as response:
        status, page = response.status, await response.json(loads=orjson.loads)

    assert status == 200, page
    assert [item["response"]["body"] for item in page["data"]] == [too_deep, too_deep], "shown as JSON text"


async def test_a_405_names_every_method_of_the_path(uploader: Uploader) -> None:
    for path, allowed in [
        ("/v1/files", "GET, POST"),
        ("/v1/files/file-" + "0" * 32, "DELETE, GET"),
        ("/v1/batches", "GET, POST"),
    ]:
        async with uploader.http.put(
            uploader.api.url + path, headers={"Authorization": f"Bearer {uploader.key}"}
        ) as response:
            assert response.status == 405
            assert response.headers["Allow"] == allowed, path
            assert_envelope(await response.json(), code="method_not_allowed", param=None)
