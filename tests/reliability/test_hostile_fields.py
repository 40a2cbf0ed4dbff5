"""Scenario 6, hostile input, field by field: every JSON body, form field, query parameter and path parameter
the API takes, given lone surrogates, NUL, deep nesting, huge numbers and bytes that are not UTF-8, answers a
400 with the documented code (a 404 for an id, as for any malformed id), never a 500, on SQLite and PostgreSQL;
nothing is stored and nothing is logged at ERROR. Also: an upload whose `Content-Length` is over the limit is
refused before its body is sent, a create body over 1 MiB is a 413, a model name over 256 characters is a bad
line.

The JSONL lines themselves are fuzzed in `test_hostile_input.py` and `test_hostile_uploads.py`.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from fusillade.api.uploads import FORM_ALLOWANCE
from fusillade.domain import ids, jsonl, models
from fusillade.storage import base
from tests.support.api_server import RunningApi, create_key, running_api

pytestmark = pytest.mark.reliability

CHAT = "/v1/chat/completions"
LIMITS = jsonl.Limits(max_bytes=1024 * 1024)
SURROGATE = rb"\ud800"
"""A lone surrogate as JSON writes it: six ASCII characters that decode to no character."""
DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INTEGER = b"1" * 5000


@dataclass
class Client:
    api: RunningApi
    http: aiohttp.ClientSession
    key: str
    file_id: str = ""

    async def call(self, method: str, path: str, **options: Any) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {self.key}", **options.pop("headers", {})}
        if isinstance(options.get("data"), bytes) and len(options["data"]) > 1024 * 1024:
            options["data"] = io.BytesIO(options["data"])  # aiohttp warns about large raw bodies
        async with self.http.request(method, self.api.url + path, headers=headers, **options) as response:
            raw = await response.read()
            body = orjson.loads(raw) if response.content_type == "application/json" else raw
            return response.status, body, dict(response.headers)

    async def upload(
        self, content: bytes, *, filename: str | bytes = "input.jsonl", purpose: bytes = b"batch"
    ) -> Any:
        boundary = "hostile-boundary"
        name = filename.encode() if isinstance(filename, str) else filename
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'.encode()
            + purpose
            + f"\r\n--{boundary}\r\n".encode()
            + b'Content-Disposition: form-data; name="file"; filename="'
            + name
            + b'"\r\n\r\n'
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return await self.call("POST", "/v1/files", data=body, headers=headers)


def request_line(custom_id: str = "r-1", model: str = "model-a") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}) + b"\n"


@pytest.fixture
async def client(storage: base.Storage, tmp_path: Path) -> AsyncIterator[Client]:
    connector = aiohttp.TCPConnector(force_close=True)  # a hostile request must not spoil the next one's socket
    async with aiohttp.ClientSession(connector=connector) as http, running_api(storage, limits=LIMITS) as api:
        found = Client(api, http, await create_key(storage, "mallory"))
        status, uploaded, _ = await found.upload(request_line())
        assert status == 200, uploaded
        found.file_id = uploaded["id"]
        yield found


@pytest.fixture
def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The ERROR records of the API during the test (a 500 would log one)."""
    caplog.set_level(logging.WARNING)
    return caplog.records


def create_body(client: Client, **fields: Any) -> bytes:
    return orjson.dumps({"input_file_id": client.file_id, "endpoint": CHAT, "completion_window": "24h", **fields})


def hostile_creates(client: Client) -> dict[str, tuple[bytes, int, str, str | None]]:
    """name: (body, status, code, param) of `POST /v1/batches`."""
    marked = create_body(client, metadata={"team": "MARK"})
    return {
        "not UTF-8": (
            b'{"input_file_id": "\xff", "endpoint": "' + CHAT.encode() + b'"}',
            400,
            "invalid_value",
            None,
        ),
        # Python's JSON reader takes the UTF-8 form of a surrogate for the surrogate itself.
        "UTF-8 of a surrogate in metadata": (
            marked.replace(b"MARK", b"\xed\xa0\x80"),
            400,
            "invalid_value",
            "metadata",
        ),
        "nested 100,000 deep": (
            create_body(client)[:-1] + b',"metadata":' + DEEP + b"}",
            400,
            "invalid_value",
            None,
        ),
        "the body nested 100,000 deep": (DEEP, 400, "invalid_value", None),
        "a 5,000-digit integer": (
            create_body(client)[:-1] + b',"completion_window":' + HUGE_INTEGER + b"}",
            400,
            "invalid_value",
            None,
        ),
        "a 5,000-digit integer in metadata": (marked.replace(b'"MARK"', HUGE_INTEGER), 400, "invalid_value", None),
        "a number too large for a float": (
            marked.replace(b'"MARK"', b"1e999999"),
            400,
            "invalid_value",
            "metadata.team",
        ),
        "a surrogate in a metadata value": (marked.replace(b"MARK", SURROGATE), 400, "invalid_value", "metadata"),
        "a surrogate in a metadata key": (
            create_body(client, metadata={"MARK": "x"}).replace(b"MARK", SURROGATE),
            400,
            "invalid_value",
            "metadata",
        ),
        "a surrogate pair cut in two in metadata": (
            marked.replace(b"MARK", rb"\udc00\ud800"),
            400,
            "invalid_value",
            "metadata",
        ),
        "NUL in a metadata value": (marked.replace(b"MARK", rb"a\u0000b"), 400, "invalid_value", "metadata"),
        "NUL in a metadata key": (
            create_body(client, metadata={"a\x00": "x"}),
            400,
            "invalid_value",
            "metadata",
        ),
        "a surrogate in endpoint": (
            create_body(client).replace(CHAT.encode(), SURROGATE),
            400,
            "invalid_value",
            "endpoint",
        ),
        "NUL in endpoint": (create_body(client, endpoint=CHAT + "\x00"), 400, "invalid_value", "endpoint"),
        "a surrogate in completion_window": (
            create_body(client, completion_window="MARK").replace(b"MARK", SURROGATE),
            400,
            "invalid_value",
            "completion_window",
        ),
        "NUL in completion_window": (
            create_body(client, completion_window="24h\x00"),
            400,
            "invalid_value",
            "completion_window",
        ),
        "a huge completion_window": (
            create_body(client, completion_window="9" * 5000 + "h"),
            400,
            "invalid_value",
            "completion_window",
        ),
        "a surrogate in input_file_id": (
            create_body(client).replace(client.file_id.encode(), b"file-" + SURROGATE),
            404,
            "not_found",
            None,
        ),
        "NUL in input_file_id": (
            create_body(client).replace(client.file_id.encode(), client.file_id.encode() + rb"\u0000"),
            404,
            "not_found",
            None,
        ),
        "not JSON": (b"{'input_file_id': 1}", 400, "invalid_value", None),
        "a JSON array": (b"[]", 400, "invalid_value", None),
    }


async def test_every_hostile_create_body_is_a_400_that_stores_nothing(
    client: Client, storage: base.Storage, errors_logged: list[logging.LogRecord]
) -> None:
    for name, (body, status, code, param) in hostile_creates(client).items():
        answer = await client.call("POST", "/v1/batches", data=body, headers={"Content-Type": "application/json"})
        assert (answer[0], answer[1]["error"]["code"], answer[1]["error"]["param"]) == (status, code, param), (
            name,
            answer[1],
        )
        assert answer[2].get("x-should-retry") == "false", name
    assert (await storage.list_batches(owner=models.ALL_OWNERS)).items == [], "no hostile create made a batch"
    assert [record.getMessage() for record in errors_logged] == []


async def test_a_hostile_idempotency_key_is_refused_or_kept_verbatim(
    client: Client, storage: base.Storage
) -> None:
    body = create_body(client)
    # HTTP carries header values as bytes; these are the ones a server takes (obs-text is read as Latin-1).
    status, batch, _ = await client.call(
        "POST",
        "/v1/batches",
        data=body,
        headers={"Content-Type": "application/json", "Idempotency-Key": "k\xff\x80"},
    )
    assert status == 200, batch
    again = await client.call(
        "POST",
        "/v1/batches",
        data=body,
        headers={"Content-Type": "application/json", "Idempotency-Key": "k\xff\x80"},
    )
    assert (again[0], again[1]["id"]) == (200, batch["id"]), "the key was stored and found again as sent"
    too_long = await client.call(
        "POST",
        "/v1/batches",
        data=body,
        headers={"Content-Type": "application/json", "Idempotency-Key": "k" * 256},
    )
    assert (too_long[0], too_long[1]["error"]["param"]) == (400, "Idempotency-Key")


QUERIES = [
    "after=%ED%A0%80",
    "after=%00",
    "after=%FF",
    "after=" + "f" * 10_000,
    "limit=1e400",
    "limit=" + "9" * 5000,
    "limit=%00",
    "purpose=%ED%A0%80",
    "purpose=batch%00",
    "order=%FF",
]


async def test_every_hostile_query_parameter_is_a_400(
    client: Client, errors_logged: list[logging.LogRecord]
) -> None:
    batch_path = f"/v1/batches/batch_{'0' * 32}/requests"
    for path in ("/v1/files", "/v1/batches", batch_path):
        for query in [*QUERIES, "state=%ED%A0%80", "state=pending%00"]:
            status, body, _ = await client.call("GET", f"{path}?{query}")
            if path == batch_path and status == 404:
                continue  # the batch does not exist: a 404 before the query is looked at is fine too
            if query.startswith(("purpose", "order")) and path != "/v1/files":
                assert status in (200, 404), (path, query, body)  # not a parameter of this route: ignored
                continue
            if query.startswith("state") and path != batch_path:
                assert status == 200, (path, query, body)
                continue
            assert status == 400, (path, query, body)
            assert body["error"]["code"] == "invalid_value", (path, query, body)
    assert [record.getMessage() for record in errors_logged] == []


PATH_IDS = ["%ED%A0%80", "%00", "%FF", "batch_" + "%00" * 32, "x" * 10_000, "..%2F..%2Fetc"]


async def test_every_hostile_path_parameter_is_a_404(
    client: Client, errors_logged: list[logging.LogRecord]
) -> None:
    for raw in PATH_IDS:
        for method, path in [
            ("GET", f"/v1/batches/{raw}"),
            ("POST", f"/v1/batches/{raw}/cancel"),
            ("POST", f"/v1/batches/{raw}/retry"),
            ("GET", f"/v1/batches/{raw}/requests"),
            ("GET", f"/v1/files/{raw}"),
            ("GET", f"/v1/files/{raw}/content"),
            ("DELETE", f"/v1/files/{raw}"),
            ("GET", f"/v1/models/{raw}"),
        ]:
            status, body, headers = await client.call(method, path, data=b'{"x": "\xff' + DEEP[:1000])
            assert (status, body["error"]["code"]) == (404, "not_found"), (method, path, body)
            assert headers.get("x-should-retry") == "false"
    assert [record.getMessage() for record in errors_logged] == []


async def test_hostile_upload_form_fields_are_a_400_or_cleaned(
    client: Client, storage: base.Storage, errors_logged: list[logging.LogRecord]
) -> None:
    for purpose in (b"\xed\xa0\x80", b"\xff", b"batch\x00", b"", b"batch" * 20_000, b"\\ud800"):
        status, body, _ = await client.upload(request_line(), purpose=purpose)
        assert (status, body["error"]["param"], body["error"]["code"]) == (400, "purpose", "invalid_value"), body
    for raw_name in (
        b"a\xed\xa0\x80b.jsonl",
        b"a\x00b\x01.jsonl",
        b"\xff\xfe.jsonl",
        b"\\ud800.jsonl",
        b"x" * 600,
    ):
        status, body, _ = await client.upload(request_line(), filename=raw_name)
        assert status == 200, (raw_name, body)
        name = body["filename"]
        assert name.isprintable() and len(name) <= 255, name
        stored = await storage.get_file(ids.parse_file_id(body["id"]), owner=models.ALL_OWNERS)
        assert stored.filename == name
    status, body, _ = await client.upload(request_line(), filename=b"x" * 60_000)
    assert (status, body["error"]["param"]) == (400, "file"), "a part's headers are bounded"
    assert [record.getMessage() for record in errors_logged] == []


async def test_a_model_name_over_256_characters_is_a_bad_line(client: Client) -> None:
    status, body, _ = await client.upload(request_line("ok") + request_line("long", model="m" * 100_000))
    assert status == 400
    assert body["error"]["code"] == "invalid_file"
    assert body["error"]["lines"] == [
        {"line": 2, "message": "body.model is 100000 characters long; a model name has at most 256."}
    ]


async def test_an_upload_over_the_limit_is_refused_from_its_content_length(client: Client) -> None:
    """The answer comes before a byte of the body is sent (the client never sends it)."""
    host, port = client.api.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        declared = LIMITS.max_bytes + FORM_ALLOWANCE + 1
        writer.write(
            f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {client.key}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {declared}\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(
                    b":"
                )[1]
            )
            answer = orjson.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert (answer["error"]["code"], answer["error"]["param"]) == ("invalid_file", "file")
    assert "larger than 1,048,576 bytes (1 MiB)" in answer["error"]["message"]
    # Just under: the body is read, and a real file of that size is refused only once it passes the limit.
    status, body, _ = await client.upload(b"x" * (LIMITS.max_bytes + 1))
    assert (status, body["error"]["code"]) == (400, "invalid_file")


async def test_a_create_body_over_1_mib_is_a_413(client: Client, storage: base.Storage) -> None:
    body = create_body(client, metadata={"team": "x"}, padding="y" * (1024 * 1024))

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: cut off once it passes the limit
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    for data in (body, chunked()):
        status, answer, headers = await client.call(
            "POST", "/v1/batches", data=data, headers={"Content-Type": "application/json"}
        )
        assert (status, answer["error"]["code"]) == (413, "request_too_large"), answer
        assert headers.get("x-should-retry") == "false"
    assert (await storage.list_batches(owner=models.ALL_OWNERS)).items == []
