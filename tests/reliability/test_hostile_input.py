"""Scenario 6, hostile input: what a careless or malicious client or upstream sends never crashes fusillade and
never leaves half of an upload behind.

- JSONL uploads (property, over the real HTTP API on SQLite and PostgreSQL): good lines mixed with hostile
  ones (invalid JSON, non-UTF-8, non-objects, control characters and NUL in `custom_id` or `model`, a raw
  newline inside a `custom_id`, duplicates, bodies nested deeper than JSON writers go, hosts in `url`, blank
  lines, byte order marks mid-file, lone surrogates). A file with any bad line is a 400 naming exactly its
  bad lines, and the database holds no new file row and no new template; a file without one is stored whole.
- The same files through `jsonl.validate` alone, many more of them: only `ValidationError`, the same lines.
- Multipart framing (property, over HTTP): cut, doubled, garbled forms are a 400 storing nothing, or, when the
  form is still whole, a 200 storing the whole file.
- Upstream answers (property, `UpstreamClient` against a raw socket server): malformed, truncated and
  garbled SSE, absurd `Retry-After` values, short bodies, deep JSON: every call ends as an `Outcome`, never an
  exception (an exception would leave the request in `processing`); the SSE parser and the reassemblers alone,
  many more streams: only their documented errors.
- Explicit refusals over HTTP, each a 400 with the error envelope (and the line number where there is one).

Covered elsewhere and not repeated here (tests/e2e/test_api.py): an oversized file of many lines
(`test_an_oversized_upload_is_refused_with_a_clear_message`), non-UTF-8 bytes in a line
(`test_a_file_that_is_not_utf8_is_refused_with_its_line_numbers`), a multipart without a file part, without
`purpose` or not multipart at all (`test_malformed_upload_forms_are_refused`), a model without a route and a
line that is a JSON array (`test_a_bad_file_lists_every_bad_line`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fusillade import errors
from fusillade.domain import ids, jsonl, models
from fusillade.storage import base
from fusillade.upstream import classify, reassemble, sse
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.outcome import Outcome, Permanent, Retriable, Success
from fusillade.upstream.routes import PhaseTimeouts, Route
from tests.reliability import conftest
from tests.reliability.hostile_upstream import RawUpstream, Script
from tests.support import backends, factories
from tests.support.api_server import ROUTED_MODELS, RunningApi, create_key, running_api

pytestmark = pytest.mark.reliability

CHAT = "/v1/chat/completions"
LIMITS = jsonl.Limits(max_bytes=256 * 1024, max_custom_id_length=64)
"""The API's upload limits in this scenario (small, so that going over them is cheap)."""
LONG_EXAMPLES = 10
"""`pytest --long` runs this many times the examples of each property."""


def examples(count: int) -> settings:
    """Hypothesis settings of a property run over real sockets and databases: `count` examples (more under
    `--long`), no deadline (the machine is shared), no example database (nothing left in the checkout)."""
    return settings(
        max_examples=count * (LONG_EXAMPLES if conftest.LONG else 1),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ----------------------------------------------------------------------------------- hostile JSONL files

names = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=12)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
CONTROL_CHARACTERS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f"]


def request_line(custom_id: str, *, model: str = "model-a", **changes: Any) -> bytes:
    record: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": f"hello {custom_id}"}]},
    }
    return orjson.dumps(record | changes)


def deep(depth: int) -> str:
    """JSON nested `depth` levels deep (as text: orjson refuses to write it, which is the point)."""
    return "[" * depth + "]" * depth


def deep_line(custom_id: str, depth: int) -> bytes:
    """A request line whose body holds an array nested `depth` levels deep."""
    return request_line(custom_id).replace(
        b'"messages":', b'"nested":' + deep(depth).encode() + b',"messages":', 1
    )


@dataclass(frozen=True)
class Piece:
    """Consecutive physical lines of a file (without their line ends), the indexes of those that are bad,
    and the requests the good ones make."""

    lines: tuple[bytes, ...]
    bad: frozenset[int] = frozenset({0})
    requests: int = 0


def good(custom_id: str, model: str = "model-a") -> Piece:
    return Piece((request_line(custom_id, model=model),), frozenset(), 1)


def _garbage(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((b"{" + draw(st.binary(max_size=40)).replace(b"\n", b" "),))


def _not_utf8(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((request_line(fresh).replace(fresh.encode(), fresh.encode() + b"\xff\xfe"),))


def _not_object(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((orjson.dumps(draw(json_values.filter(lambda item: not isinstance(item, dict)))),))


def _control_in_custom_id(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((request_line(fresh + draw(st.sampled_from(CONTROL_CHARACTERS)) + "x"),))


def _control_in_model(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((request_line(fresh, model="model-a" + draw(st.sampled_from(CONTROL_CHARACTERS))),))


def _raw_newline_in_custom_id(fresh: str, draw: st.DrawFn) -> Piece:
    first, _, second = request_line(f"{fresh}@@split").partition(b"@@")
    return Piece((first, second), frozenset({0, 1}))


def _host_in_url(fresh: str, draw: st.DrawFn) -> Piece:
    url = draw(st.sampled_from(["http://169.254.169.254" + CHAT, "//evil.example" + CHAT, "file:///etc/x"]))
    return Piece((request_line(fresh, url=url),))


def _blank_then_request(fresh: str, draw: st.DrawFn) -> Piece:
    blank = draw(st.sampled_from([b"", b" ", b"\t \t"]))
    return Piece((blank, request_line(f"{fresh}-after-blank")), frozenset({0}), 1)


HOSTILE: dict[str, Callable[[str, st.DrawFn], Piece]] = {
    "garbage": _garbage,
    "not_utf8": _not_utf8,
    "not_object": _not_object,
    "control_in_custom_id": _control_in_custom_id,
    "control_in_model": _control_in_model,
    "raw_newline_in_custom_id": _raw_newline_in_custom_id,
    "deep_body": lambda fresh, draw: Piece((deep_line(fresh, draw(st.integers(254, 1100))),)),
    "host_in_url": _host_in_url,
    "wrong_method": lambda fresh, draw: Piece(
        (request_line(fresh, method=draw(st.sampled_from(["GET", "post", None, 1]))),)
    ),
    "unrouted_model": lambda fresh, draw: Piece((request_line(fresh, model="gpt-unrouted"),)),
    "long_custom_id": lambda fresh, draw: Piece((request_line(fresh + "x" * LIMITS.max_custom_id_length),)),
    "blank_then_request": _blank_then_request,
    # Bad on line 1 too: the mark is skipped there, and `[1]` is no object.
    "byte_order_mark": lambda fresh, draw: Piece((b"\xef\xbb\xbf[1]",)),
    "lone_surrogate": lambda fresh, draw: Piece((request_line("SURROGATE").replace(b"SURROGATE", rb"\ud800"),)),
    "nul_byte": lambda fresh, draw: Piece((request_line(fresh).replace(b'"method"', b'\x00"method"'),)),
}
"""Hostile pieces, each bad wherever it stands; `fresh` is a custom_id of its own (unique in the file)."""
HOSTILE_KINDS = [*HOSTILE, "duplicate_custom_id"]


@dataclass(frozen=True)
class HostileFile:
    data: bytes
    bad_lines: tuple[int, ...]
    """1-based numbers of the lines that must be reported."""
    requests: int
    """Requests stored when the file is good."""
    kinds: tuple[str, ...]


@st.composite
def hostile_files(draw: st.DrawFn, max_hostile: int = 3) -> HostileFile:
    custom_ids = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    pieces = [good("req-" + custom_id, draw(st.sampled_from(sorted(ROUTED_MODELS)))) for custom_id in custom_ids]
    kinds = draw(st.lists(st.sampled_from(HOSTILE_KINDS), max_size=max_hostile))
    for n, kind in enumerate(kinds):
        position = draw(st.integers(0, len(pieces)))
        if kind == "duplicate_custom_id":
            # A copy of a good line placed after it: the copy is the bad one.
            originals = [index for index, piece in enumerate(pieces) if not piece.bad]
            original = draw(st.sampled_from(originals))
            position = draw(st.integers(original + 1, len(pieces)))
            piece = Piece(pieces[original].lines)
        else:
            piece = HOSTILE[kind](f"hostile-{n}", draw)
        pieces.insert(position, piece)
    lines: list[bytes] = []
    bad: list[int] = []
    for piece in pieces:
        bad += [len(lines) + 1 + index for index in sorted(piece.bad)]
        lines += piece.lines
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = ending.join(lines) + (ending if draw(st.booleans()) else b"")
    return HostileFile(data, tuple(bad), sum(piece.requests for piece in pieces), tuple(kinds))


async def validate(
    data: bytes, chunk_size: int
) -> tuple[list[models.TemplateInput], errors.ValidationError | None]:
    templates: list[models.TemplateInput] = []
    try:
        async for template in jsonl.validate(
            jsonl.iterate_chunks(data, chunk_size), LIMITS, model_allowed=ROUTED_MODELS.__contains__
        ):
            templates.append(template)
    except errors.ValidationError as exc:
        return templates, exc
    return templates, None


@examples(300)
@given(hostile_files(), st.integers(1, 300))
async def test_the_validator_reports_exactly_the_hostile_lines(file: HostileFile, chunk_size: int) -> None:
    templates, error = await validate(file.data, chunk_size)

    if file.bad_lines:
        assert error is not None, file.kinds
        assert [line.line for line in error.errors] == list(file.bad_lines), (file.kinds, error.errors)
        assert all(line.reason for line in error.errors)
    else:
        assert error is None, error.errors if error else None
        assert len(templates) == file.requests
        assert all(orjson.loads(template.body) for template in templates)


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


# ------------------------------------------------------------------------------------ upstream answers

KEYS = ["choices", "index", "delta", "content", "tool_calls", "function", "arguments", "name", "logprobs"]
KEYS += ["error", "usage", "finish_reason", "role", "text", "type", "response", "object", "code", "status"]
stream_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=14,
)
event_data = st.one_of(
    stream_json.map(lambda value: orjson.dumps(value).decode()),
    st.text(max_size=20).map(lambda text: orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})),
    st.text(max_size=20).map(lambda text: orjson.dumps({"choices": [{"index": 0, "text": text}]})),
    st.integers(200, 1100).map(
        lambda n: '{"choices":[{"index":0,"delta":{"content":"x","extra":' + deep(n) + "}}]}"
    ),
    st.integers(200, 1100).map(lambda n: '{"type":"response.completed","response":{"x":' + deep(n) + "}}"),
    st.sampled_from(
        [
            sse.DONE,
            '{"error": {"message": "overloaded", "code": 529}}',
            '{"error": {"status": "503"}}',
            '{"type": "response.failed", "response": {"error": {"code": "server_error"}}}',
            '{"object": "error", "code": 1e999}',
            "1e999",
            "[",
        ]
    ),
    st.text(max_size=20),
).map(lambda data: data if isinstance(data, str) else data.decode())
event_names = st.sampled_from(
    ["", "", "error", "response.completed", "response.failed", "response.output_text.delta"]
)


well_formed_data = st.one_of(
    st.text(max_size=20).map(lambda text: {"choices": [{"index": 0, "delta": {"content": text}}]}),
    st.text(max_size=20).map(lambda text: {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}),
    st.just({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
).map(lambda value: orjson.dumps(value).decode())
deep_chunks = st.integers(254, 1000).map(
    lambda n: (
        '{"choices":[{"index":0,"delta":{"content":"x","extra":'
        + deep(n)
        + '},"text":"y","logprobs":{'
        + '"content":'
        + deep(n)
        + "}}]}"
    )
)
completed_responses = st.one_of(
    st.just('{"type":"response.completed","response":{"id":"r","output":[]}}'),
    st.integers(254, 1000).map(lambda n: '{"type":"response.completed","response":{"x":' + deep(n) + "}}"),
)


@st.composite
def sse_bodies(draw: st.DrawFn) -> tuple[bytes, ...]:
    """An SSE body cut into chunks: either well-formed events (whose data may still be nested deeper than a JSON
    writer goes), or any events with random fields, line ends, comments and garbage."""
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    body = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    if draw(st.booleans()):
        events = [(data, "") for data in draw(st.lists(well_formed_data | deep_chunks, max_size=4))]
        events += [(data, "") for data in draw(st.lists(completed_responses, max_size=1))]
        events.append((sse.DONE, ""))
        for data, _ in events:
            body += b"data: " + data.encode() + ending + ending
    else:
        for data, name in draw(st.lists(st.tuples(event_data, event_names), max_size=8)):
            if name:
                body += b"event: " + name.encode() + ending
            for field in draw(
                st.lists(st.sampled_from([b": ping", b"id: 7", b"retry: 99999999999999999999"]), max_size=2)
            ):
                body += field + ending
            body += b"".join(b"data: " + part.encode() + ending for part in data.split("\n"))
            body += ending if draw(st.integers(0, 9)) else b""  # sometimes an event is not closed
            if not draw(st.integers(0, 7)):
                body += draw(st.binary(max_size=12))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
    return tuple(body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True) if end > start)


PATHS = [CHAT, "/v1/completions", "/v1/responses"]


DEEP_STREAMS = {
    CHAT: b'data: {"choices":[{"index":0,"delta":{"content":' + deep(300).encode() + b"}}]}\n\ndata: [DONE]\n\n",
    "/v1/responses": b'data: {"type":"response.completed","response":{"x":' + deep(300).encode() + b"}}\n\n",
}
"""Regressions: a stream whose reassembled body orjson cannot write raised TypeError, not StreamError."""


@examples(500)
@given(chunks=sse_bodies(), path=st.sampled_from(PATHS), max_event_bytes=st.integers(16, 64 * 1024))
@example(chunks=(DEEP_STREAMS[CHAT],), path=CHAT, max_event_bytes=64 * 1024)
@example(chunks=(DEEP_STREAMS["/v1/responses"],), path="/v1/responses", max_event_bytes=64 * 1024)
def test_the_sse_parser_and_reassemblers_raise_only_their_documented_errors(
    chunks: tuple[bytes, ...], path: str, max_event_bytes: int
) -> None:
    make = reassemble.reassembler_for(path)
    assert make is not None
    parser = sse.SSEParser(max_event_bytes=max_event_bytes)
    reassembler = make()
    try:
        for chunk in chunks:
            for event in parser.feed(chunk):
                reassembler.add(event)
        for event in parser.finish():
            reassembler.add(event)
        body = reassembler.finish()
    except (sse.SSEError, reassemble.StreamError):
        return
    except reassemble.EmbeddedError as embedded:
        outcome = classify.classify_embedded_error(embedded)
        assert isinstance(outcome, Retriable | Permanent) and outcome.code == classify.UPSTREAM_ERROR
        assert outcome.body is None or orjson.loads(outcome.body) is not None or outcome.body == "null"
        return
    assert isinstance(orjson.loads(body), dict), "a reassembled body is a JSON object"


RETRY_AFTER_VALUES = [
    "1", "0", "-1", "", " ", "1.5", "nan", "inf", "1e999", "99999999999999999999999", "3600", "0x10", "١٢",
    "Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT", "tomorrow",
]  # fmt: skip
STATUSES = [200, 201, 204, 302, 400, 401, 404, 408, 409, 422, 429, 499, 500, 502, 503, 504, 529, 599]
plain_bodies = st.one_of(
    json_values.map(orjson.dumps),
    st.binary(max_size=60),
    st.integers(200, 1100).map(lambda n: ('{"id": "x", "choices": ' + deep(n) + "}").encode()),
    st.sampled_from([b"", b'{"error": {"message": "m", "code": 500}}', b'{"object": "error"}', b"\xff{}"]),
    st.just(b"x" * 70_000),  # over the client's size cap
)


@st.composite
def upstream_scripts(draw: st.DrawFn) -> tuple[Script, bool, bool]:
    """(script, stream it?, is the body sent whole?)."""
    if draw(st.booleans()):
        return Script(SSE_HEAD + b"; charset=utf-8", draw(sse_bodies())), True, True
    status = draw(st.sampled_from(STATUSES))
    body = draw(plain_bodies)
    head = b"HTTP/1.1 %d Whatever\r\nContent-Type: application/json" % status
    for name in draw(st.lists(st.sampled_from([b"Retry-After", b"retry-after-ms"]), max_size=2, unique=True)):
        head += b"\r\n" + name + b": " + draw(st.sampled_from(RETRY_AFTER_VALUES)).encode()
    framing = draw(st.sampled_from(["length", "close", "short"]))
    whole = framing != "short"
    if framing == "length":
        head += b"\r\nContent-Length: %d" % len(body)
    elif framing == "short":
        head += b"\r\nContent-Length: %d" % (len(body) + draw(st.integers(1, 1000)))
    cut = draw(st.integers(1, max(1, len(body))))
    return Script(head, tuple(part for part in (body[:cut], body[cut:]) if part)), False, whole


def claimed(path: str) -> models.ClaimedRequest:
    now = datetime.now(UTC)
    return models.ClaimedRequest(
        id=ids.new_request_id(),
        batch_id=ids.new_batch_id(),
        owner="mallory",
        custom_id="hostile",
        model="model-a",
        method="POST",
        url=path,
        body=orjson.dumps({"model": "model-a", "messages": [], "prompt": "p", "input": "i"}).decode(),
        attempt=0,
        deadline=now + timedelta(hours=1),
        daemon_id=ids.new_daemon_id(),
        claimed_at=now,
    )


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    async with RawUpstream() as server:
        yield server


@pytest.fixture
async def small_client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient(max_response_bytes=64 * 1024) as upstream_client:
        yield upstream_client


TIMEOUTS = PhaseTimeouts(
    connect=timedelta(seconds=10), first_byte=timedelta(seconds=20), idle=timedelta(seconds=20), total=None
)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"


@examples(80)
@given(scripted=upstream_scripts(), path=st.sampled_from([*PATHS, "/v1/embeddings"]))
@example(scripted=(Script(SSE_HEAD, (DEEP_STREAMS[CHAT],)), True, True), path=CHAT)
@example(scripted=(Script(SSE_HEAD, (DEEP_STREAMS["/v1/responses"],)), True, True), path="/v1/responses")
async def test_every_upstream_answer_ends_as_an_outcome(
    raw_upstream: RawUpstream, small_client: UpstreamClient, scripted: tuple[Script, bool, bool], path: str
) -> None:
    script, stream, whole = scripted
    raw_upstream.script = script
    sent = raw_upstream.requests
    route = Route(base_url=raw_upstream.url, stream=stream, timeouts=TIMEOUTS)

    outcome: Outcome = await small_client.send(claimed(path), route)

    assert raw_upstream.requests == sent + 1
    assert isinstance(outcome, Success | Retriable | Permanent)
    if isinstance(outcome, Success):
        assert 200 <= outcome.status_code <= 299
        orjson.loads(outcome.body)  # stored as JSON text
    else:
        assert outcome.code and outcome.message
        assert outcome.body is None or orjson.loads(outcome.body) is not None or outcome.body == "null"
    if isinstance(outcome, Retriable) and outcome.retry_after is not None:
        assert timedelta(0) <= outcome.retry_after
    status = int(script.head.split(b" ", 2)[1])
    if not stream and whole and status >= 300 and outcome.code != classify.RESPONSE_TOO_LARGE:
        assert outcome.code == f"http_{status}", (script.head, outcome)
        retriable = status in (408, 429) or 500 <= status <= 599
        assert isinstance(outcome, Retriable if retriable else Permanent), outcome
