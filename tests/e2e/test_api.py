"""The HTTP API over a real socket with a raw HTTP client (aiohttp), each test once per backend: envelopes,
status codes and headers, idempotent creates, tenancy, streamed downloads, refused uploads, and the extras."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from fusillade.domain import ids, jsonl, models
from fusillade.storage import base
from tests.support import factories
from tests.support.api_server import ADMIN_KEY, FlakyStorage, RunningApi, create_key, running_api

CHAT = factories.CHAT
MAX_BYTES = 200_000

FILE_FIELDS = {
    "id",
    "object",
    "bytes",
    "created_at",
    "filename",
    "purpose",
    "status",
    "expires_at",
    "status_details",
}
BATCH_FIELDS = {
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
    "model",
    "usage",
}
LIST_FIELDS = {"object", "data", "first_id", "last_id", "has_more"}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    directory = tmp_path / "spool"
    directory.mkdir()
    return directory


@pytest.fixture
async def api(storage: base.Storage, spool: Path, registry: CollectorRegistry) -> AsyncIterator[RunningApi]:
    async with running_api(
        storage, limits=jsonl.Limits(max_bytes=MAX_BYTES), spool_directory=spool, registry=registry
    ) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def alice(api: RunningApi) -> str:
    return await create_key(api.storage, "alice")


@pytest.fixture
async def bob(api: RunningApi) -> str:
    return await create_key(api.storage, "bob")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def request_lines(count: int, *, prefix: str = "req", model: str = "model-a") -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"{prefix}-{n}",
                "method": "POST",
                "url": CHAT,
                "body": {"model": model, "messages": [{"role": "user", "content": f"hello {n}"}]},
            }
        )
        + b"\n"
        for n in range(1, count + 1)
    )


def form(content: bytes, *, purpose: str | None = "batch", filename: str = "input.jsonl") -> aiohttp.FormData:
    data = aiohttp.FormData(quote_fields=False)
    if purpose is not None:
        data.add_field("purpose", purpose)
    data.add_field("file", content, filename=filename, content_type="application/octet-stream")
    return data


class Client:
    """Requests of one caller, answering (status, headers, parsed JSON body)."""

    def __init__(self, http: aiohttp.ClientSession, api: RunningApi, key: str | None) -> None:
        self.http = http
        self.url = api.url
        self.headers = bearer(key) if key is not None else {}

    async def call(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **options: Any
    ) -> tuple[int, Any, Any]:
        async with self.http.request(
            method, self.url + path, headers={**self.headers, **(headers or {})}, **options
        ) as response:
            raw = await response.read()
            body = orjson.loads(raw) if response.content_type == "application/json" else raw
            return response.status, response.headers, body

    async def upload(self, content: bytes, **options: Any) -> dict[str, Any]:
        status, _, body = await self.call("POST", "/v1/files", data=form(content, **options))
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    async def create_batch(self, file_id: str, **options: Any) -> dict[str, Any]:
        payload = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **options}
        status, _, body = await self.call("POST", "/v1/batches", json=payload)
        assert status == 200, body
        return body  # type: ignore[no-any-return]


def assert_error(body: Any, *, code: str, param: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["message"]
    return error


# ----------------------------------------------------------------------------------------------- files


async def test_an_uploaded_file_has_every_field_of_the_openai_file_object(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    content = request_lines(3)

    uploaded = await client.upload(content, filename="my requests.jsonl")
    status, _, retrieved = await client.call("GET", f"/v1/files/{uploaded['id']}")

    assert status == 200
    assert retrieved == uploaded
    assert set(uploaded) == FILE_FIELDS
    assert uploaded["id"].startswith("file-")
    assert uploaded["object"] == "file"
    assert uploaded["bytes"] == len(content)
    assert isinstance(uploaded["created_at"], int)
    assert (uploaded["filename"], uploaded["purpose"], uploaded["status"]) == (
        "my requests.jsonl",
        "batch",
        "processed",
    )
    status, headers, downloaded = await client.call("GET", f"/v1/files/{uploaded['id']}/content")
    assert status == 200
    assert headers["Content-Type"].startswith("application/jsonl")
    assert [orjson.loads(item) for item in downloaded.splitlines()] == [
        orjson.loads(item) for item in content.splitlines()
    ]


async def test_the_file_list_pages_with_a_cursor_in_either_order(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    uploaded = [(await client.upload(request_lines(1, prefix=f"f{n}")))["id"] for n in range(5)]

    pages: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        query = {"limit": "2", "order": "asc", "purpose": "batch"} | ({"after": after} if after else {})
        status, _, page = await client.call("GET", "/v1/files", params=query)
        assert status == 200, page
        assert set(page) == LIST_FIELDS
        pages.append(page)
        if not page["has_more"]:
            break
        after = page["last_id"]

    assert [item["id"] for page in pages for item in page["data"]] == uploaded
    assert [len(page["data"]) for page in pages] == [2, 2, 1]
    assert pages[0]["first_id"] == uploaded[0] and pages[0]["last_id"] == uploaded[1]
    status, _, newest_first = await client.call("GET", "/v1/files", params={"purpose": "batch"})
    assert [item["id"] for item in newest_first["data"]] == uploaded[::-1]
    status, _, empty = await client.call("GET", "/v1/files", params={"purpose": "batch_output"})
    assert (empty["data"], empty["first_id"], empty["last_id"], empty["has_more"]) == ([], None, None, False)
    status, _, body = await client.call("GET", "/v1/files", params={"purpose": "fine-tune"})
    assert status == 400
    assert_error(body, code="invalid_value", param="purpose")
    status, _, body = await client.call("GET", "/v1/files", params={"after": "file-nope"})
    assert status == 400
    assert_error(body, code="invalid_value", param="after")


async def test_a_deleted_file_is_gone(http: aiohttp.ClientSession, api: RunningApi, alice: str) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(2)))["id"]

    status, _, body = await client.call("DELETE", f"/v1/files/{file_id}")

    assert (status, body) == (200, {"id": file_id, "object": "file", "deleted": True})
    status, headers, body = await client.call("GET", f"/v1/files/{file_id}")
    assert status == 404
    assert headers["x-should-retry"] == "false"
    assert_error(body, code="not_found")


async def test_an_oversized_upload_is_refused_with_a_clear_message(
    http: aiohttp.ClientSession, api: RunningApi, alice: str, spool: Path
) -> None:
    client = Client(http, api, alice)
    content = request_lines(5000)
    assert len(content) > 2 * MAX_BYTES

    status, headers, body = await client.call("POST", "/v1/files", data=form(content))

    assert status == 400
    assert headers["x-should-retry"] == "false"
    error = assert_error(body, code="invalid_file", param="file")
    assert "larger than 200,000 bytes" in error["message"]
    assert error["lines"][0]["line"] == 0
    assert (await api.storage.list_files(owner=models.ALL_OWNERS)).items == []
    assert os.listdir(spool) == []
    # The connection is still usable: the rest of the refused body was read.
    status, _, _ = await client.call("GET", "/v1/files")
    assert status == 200


async def test_a_file_that_is_not_utf8_is_refused_with_its_line_numbers(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    content = request_lines(2) + "é".encode("latin-1") + b'{"custom_id": "x"}\n' + request_lines(1, prefix="z")

    status, _, body = await client.call("POST", "/v1/files", data=form(content))

    assert status == 400
    error = assert_error(body, code="invalid_file", param="file")
    assert [item["line"] for item in error["lines"]] == [3]
    assert "UTF-8" in error["lines"][0]["message"]
    assert "line 3: The line is not valid UTF-8" in error["message"]


async def test_a_bad_file_lists_every_bad_line(http: aiohttp.ClientSession, api: RunningApi, alice: str) -> None:
    client = Client(http, api, alice)
    content = request_lines(1) + b"[1, 2]\n" + request_lines(1, prefix="b", model="gpt-unrouted") + b"\n"

    status, _, body = await client.call("POST", "/v1/files", data=form(content))

    assert status == 400
    error = assert_error(body, code="invalid_file", param="file")
    assert [item["line"] for item in error["lines"]] == [2, 3]
    assert "no route" in error["lines"][1]["message"]


async def test_malformed_upload_forms_are_refused(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    no_file = aiohttp.FormData()
    no_file.add_field("purpose", "batch")
    no_file.add_field("other", b"data", filename="x.jsonl")
    cases: list[tuple[Any, str]] = [
        (no_file, "file"),
        (form(request_lines(1), purpose=None), "purpose"),
        (form(request_lines(1), purpose="fine-tune"), "purpose"),
        (request_lines(1), "file"),  # not multipart at all
    ]
    for data, param in cases:
        status, _, body = await client.call("POST", "/v1/files", data=data)
        assert status == 400, (param, body)
        error = assert_error(body, code="invalid_file" if param == "file" else "invalid_value", param=param)
        assert "purpose" in error["message"] or "file" in error["message"]
    assert (await api.storage.list_files(owner=models.ALL_OWNERS)).items == []


async def test_purpose_may_come_after_the_file(http: aiohttp.ClientSession, api: RunningApi, alice: str) -> None:
    client = Client(http, api, alice)
    data = aiohttp.FormData()
    data.add_field("file", request_lines(2), filename="late.jsonl")
    data.add_field("purpose", "batch")

    status, _, body = await client.call("POST", "/v1/files", data=data)

    assert status == 200, body
    assert (body["filename"], body["bytes"]) == ("late.jsonl", len(request_lines(2)))


# --------------------------------------------------------------------------------------------- batches


async def test_a_created_batch_has_every_field_of_the_openai_batch(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(4)))["id"]

    batch = await client.create_batch(file_id, metadata={"team": "search"})

    assert set(batch) == BATCH_FIELDS
    assert batch["id"].startswith("batch_")
    assert (batch["object"], batch["status"], batch["endpoint"]) == ("batch", "in_progress", CHAT)
    assert batch["request_counts"] == {"total": 4, "completed": 0, "failed": 0}
    assert (batch["output_file_id"], batch["error_file_id"], batch["errors"]) == (None, None, None)
    assert batch["metadata"] == {"team": "search"}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert batch["in_progress_at"] == batch["created_at"]
    assert api.notified == [1]
    status, _, retrieved = await client.call("GET", f"/v1/batches/{batch['id']}")
    assert (status, retrieved) == (200, batch)


async def test_create_batch_refuses_bad_parameters(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(2)))["id"]
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({"endpoint": "/v1/embeddings"}, "invalid_value", None),  # the lines' url differs
        ({"endpoint": "/v1/nope"}, "invalid_value", "endpoint"),
        ({"completion_window": "tomorrow"}, "invalid_value", "completion_window"),
        ({"endpoint": 5}, "invalid_value", "endpoint"),
        ({"input_file_id": None}, "invalid_value", "input_file_id"),
    ]
    for changes, code, param in cases:
        payload = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **changes}
        status, _, body = await client.call("POST", "/v1/batches", json=payload)
        assert status == 400, (changes, body)
        assert_error(body, code=code, param=param)
    status, _, body = await client.call(
        "POST", "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings"}
    )
    assert [item["line"] for item in body["error"]["lines"]] == [1, 2]
    status, _, body = await client.call(
        "POST", "/v1/batches", json={"input_file_id": "file-" + "0" * 32, "endpoint": CHAT}
    )
    assert status == 404
    assert (await api.storage.list_batches(owner=models.ALL_OWNERS)).items == []


async def test_the_same_idempotency_key_returns_the_same_batch(
    http: aiohttp.ClientSession, api: RunningApi, alice: str, bob: str
) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(2)))["id"]
    payload = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}

    answers = [
        await client.call("POST", "/v1/batches", json=payload, headers={"Idempotency-Key": key})
        for key in ("k-1", "k-1", "k-2")
    ]

    assert [status for status, _, _ in answers] == [200, 200, 200]
    first, again, other = (body["id"] for _, _, body in answers)
    assert first == again != other
    bob_client = Client(http, api, bob)
    bob_file = (await bob_client.upload(request_lines(2)))["id"]
    status, _, bobs = await bob_client.call(
        "POST", "/v1/batches", json=payload | {"input_file_id": bob_file}, headers={"Idempotency-Key": "k-1"}
    )
    assert status == 200 and bobs["id"] not in (first, other), "keys are per owner"


async def test_an_sdk_retry_without_a_key_returns_the_batch_of_the_first_attempt(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(2)))["id"]
    payload = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}

    _, _, first = await client.call("POST", "/v1/batches", json=payload, headers={"x-stainless-retry-count": "0"})
    _, _, retry = await client.call("POST", "/v1/batches", json=payload, headers={"x-stainless-retry-count": "1"})
    _, _, again = await client.call("POST", "/v1/batches", json=payload)

    assert retry["id"] == first["id"]
    assert again["id"] != first["id"], "a fresh create (not a retry) of the same file makes another batch"
    assert len((await api.storage.list_batches(owner="alice")).items) == 2


async def test_batches_list_newest_first_with_a_cursor(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(1)))["id"]
    created = [(await client.create_batch(file_id))["id"] for _ in range(5)]

    seen: list[str] = []
    after: str | None = None
    while True:
        status, _, page = await client.call(
            "GET", "/v1/batches", params={"limit": "2"} | ({"after": after} if after else {})
        )
        assert status == 200 and set(page) == LIST_FIELDS
        seen += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]

    assert seen == created[::-1]
    status, _, body = await client.call("GET", "/v1/batches", params={"limit": "101"})
    assert status == 400
    assert_error(body, code="invalid_value", param="limit")


async def test_cancelling_a_finished_batch_is_a_400_that_must_not_be_retried(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(3)))["id"]
    running = await client.create_batch(file_id)

    status, _, cancelled = await client.call("POST", f"/v1/batches/{running['id']}/cancel")
    assert status == 200
    assert cancelled["status"] == "cancelled"  # nothing was in flight
    assert cancelled["error_file_id"] is not None and cancelled["output_file_id"] is None
    _, _, lines = await client.call("GET", f"/v1/files/{cancelled['error_file_id']}/content")
    assert {orjson.loads(item)["error"]["code"] for item in lines.splitlines()} == {"batch_cancelled"}
    again = await client.call("POST", f"/v1/batches/{running['id']}/cancel")
    assert again[0] == 200 and again[2]["status"] == "cancelled"

    finished = await client.create_batch(file_id)
    await factories.run_to_completion(api.storage, await batch_of(api, finished["id"]))
    await api.storage.finalize_batches()
    status, headers, body = await client.call("POST", f"/v1/batches/{finished['id']}/cancel")
    assert status == 400
    assert headers["x-should-retry"] == "false"
    error = assert_error(body, code="invalid_state")
    assert "cancel" in error["message"]


async def batch_of(api: RunningApi, wire_id: str) -> models.Batch:
    return await api.storage.get_batch(ids.parse_batch_id(wire_id), owner=models.ALL_OWNERS)


async def test_output_is_streamed_and_readable_while_the_batch_runs(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    count = 3000
    client = Client(http, api, alice)
    file = await factories.upload(api.storage, owner="alice", count=count)  # larger than the upload limit
    batch = await batch_of(api, (await client.create_batch(ids.file_wire(file.id)))["id"])
    daemon_id = await factories.register(api.storage)
    claimed = await factories.claim(api.storage, daemon_id, count)
    by_line = [request.id for request in await factories.all_requests(api.storage, batch.id)]
    assert len(claimed) == count
    big = "x" * 2000
    await factories.start(api.storage, daemon_id, by_line)
    await factories.apply(
        api.storage,
        daemon_id,
        *(models.Complete(request_id, 200, orjson.dumps({"text": big}).decode()) for request_id in by_line[:2000]),
    )

    partial = await client.call("GET", f"/v1/batches/{ids.batch_wire(batch.id)}")
    output_id = partial[2]["output_file_id"]
    assert partial[2]["status"] == "in_progress" and output_id is not None
    assert partial[2]["request_counts"] == {"total": count, "completed": 2000, "failed": 0}
    async with http.get(f"{api.url}/v1/files/{output_id}/content", headers=bearer(alice)) as response:
        assert response.status == 200
        assert "Content-Length" not in response.headers
        assert response.headers["Transfer-Encoding"] == "chunked"
        chunks = [chunk async for chunk in response.content.iter_any()]
    lines = b"".join(chunks).splitlines()
    assert len(lines) == 2000 and len(b"".join(chunks)) > 4_000_000
    assert len(chunks) > 1

    await factories.fail(api.storage, daemon_id, by_line[2000:2010])
    await factories.apply(
        api.storage, daemon_id, *(models.Complete(request_id, 200, "{}") for request_id in by_line[2010:])
    )
    _, _, output = await client.call("GET", f"/v1/files/{output_id}/content")
    custom_ids = [orjson.loads(item)["custom_id"] for item in output.splitlines()]
    assert sorted(custom_ids) == sorted(f"req-{n}" for n in range(1, count + 1) if not 2001 <= n <= 2010)
    _, _, done = await client.call("GET", f"/v1/batches/{ids.batch_wire(batch.id)}")
    _, _, error_lines = await client.call("GET", f"/v1/files/{done['error_file_id']}/content")
    assert [orjson.loads(item)["custom_id"] for item in error_lines.splitlines()] == [
        f"req-{n}" for n in range(2001, 2011)
    ]
    _, _, output_file = await client.call("GET", f"/v1/files/{output_id}")
    assert output_file["bytes"] == len(output) and output_file["purpose"] == "batch_output"


async def test_requests_are_listed_and_failed_ones_retried(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)
    file_id = (await client.upload(request_lines(5)))["id"]
    batch_id = (await client.create_batch(file_id))["id"]
    await factories.run_to_completion(api.storage, await batch_of(api, batch_id), failing=2)

    status, _, page = await client.call("GET", f"/v1/batches/{batch_id}/requests", params={"limit": "3"})
    assert status == 200 and set(page) == LIST_FIELDS and page["has_more"]
    assert [item["custom_id"] for item in page["data"]] == ["req-1", "req-2", "req-3"]
    _, _, rest = await client.call("GET", f"/v1/batches/{batch_id}/requests", params={"after": page["last_id"]})
    assert [item["line"] for item in rest["data"]] == [4, 5] and not rest["has_more"]
    _, _, failed = await client.call("GET", f"/v1/batches/{batch_id}/requests", params={"state": "failed"})
    assert [(item["custom_id"], item["state"], item["error"]["code"]) for item in failed["data"]] == [
        ("req-1", "failed", "timeout"),
        ("req-2", "failed", "timeout"),
    ]
    completed = page["data"][2]
    assert completed["response"]["status_code"] == 200 and completed["response"]["body"]["choices"]
    status, _, body = await client.call("GET", f"/v1/batches/{batch_id}/requests", params={"state": "lost"})
    assert status == 400
    assert_error(body, code="invalid_value", param="state")

    notified = len(api.notified)
    status, _, retried = await client.call("POST", f"/v1/batches/{batch_id}/retry")

    assert status == 200
    assert retried["status"] == "in_progress"
    assert retried["request_counts"] == {"total": 5, "completed": 3, "failed": 0}
    assert len(api.notified) == notified + 1
    _, _, pending = await client.call("GET", f"/v1/batches/{batch_id}/requests", params={"state": "pending"})
    assert [item["custom_id"] for item in pending["data"]] == ["req-1", "req-2"]


# ---------------------------------------------------------------------------------------------- tenancy


async def test_owners_cannot_see_or_touch_each_others_objects(
    http: aiohttp.ClientSession, api: RunningApi, alice: str, bob: str
) -> None:
    alice_client, bob_client = Client(http, api, alice), Client(http, api, bob)
    file_id = (await alice_client.upload(request_lines(2)))["id"]
    batch = await alice_client.create_batch(file_id)
    await bob_client.upload(request_lines(1))

    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/batches/{batch['id']}"),
        ("POST", f"/v1/batches/{batch['id']}/cancel"),
        ("GET", f"/v1/batches/{batch['id']}/requests"),
        ("POST", f"/v1/batches/{batch['id']}/retry"),
        ("GET", "/v1/files/file-" + "0" * 32),
    ]:
        status, _, body = await bob_client.call(method, path)
        assert status == 404, (method, path)
        assert_error(body, code="not_found")
    status, _, body = await bob_client.call(
        "POST", "/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT}
    )
    assert status == 404
    _, _, bob_files = await bob_client.call("GET", "/v1/files")
    _, _, bob_batches = await bob_client.call("GET", "/v1/batches")
    assert file_id not in {item["id"] for item in bob_files["data"]} and len(bob_files["data"]) == 1
    assert bob_batches["data"] == []
    status, _, still_there = await alice_client.call("GET", f"/v1/batches/{batch['id']}")
    assert status == 200 and still_there["status"] == "in_progress"

    for admin in (ADMIN_KEY, await create_key(api.storage, "ops", admin=True)):
        admin_client = Client(http, api, admin)
        _, _, every_file = await admin_client.call("GET", "/v1/files", params={"purpose": "batch"})
        assert len(every_file["data"]) == 2
        status, _, seen = await admin_client.call("GET", f"/v1/batches/{batch['id']}")
        assert status == 200 and seen["id"] == batch["id"]


async def test_the_configured_admin_key_creates_objects_as_owner_admin(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    admin_client = Client(http, api, ADMIN_KEY)
    file_id = (await admin_client.upload(request_lines(1)))["id"]

    stored = await api.storage.get_file(ids.parse_file_id(file_id), owner=models.ALL_OWNERS)

    assert stored.owner == "admin"
    status, _, _ = await Client(http, api, alice).call("GET", f"/v1/files/{file_id}")
    assert status == 404


# ------------------------------------------------------------------------------------------------- auth


async def test_requests_without_a_valid_key_are_refused(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}, bearer("fus_unknown")):
        async with http.get(api.url + "/v1/batches", headers=headers) as response:
            assert response.status == 401, headers
            assert response.headers["x-should-retry"] == "false"
            assert_error(await response.json(), code="invalid_api_key")

    client = Client(http, api, alice)
    assert (await client.call("GET", "/v1/files"))[0] == 200
    (stored,) = [key for key in await api.storage.list_api_keys() if key.owner == "alice"]
    await api.storage.revoke_api_key(stored.id)
    status, _, body = await client.call("GET", "/v1/files")
    assert status == 401, "a revoked key stops working at once"
    assert_error(body, code="invalid_api_key")


async def test_open_mode_serves_one_owner_whatever_the_key(
    http: aiohttp.ClientSession, storage: base.Storage
) -> None:
    async with running_api(storage, open_owner="local", admin_key=None) as api:
        with_key = Client(http, api, "anything-the-sdk-sends")
        without_key = Client(http, api, None)
        file_id = (await with_key.upload(request_lines(1)))["id"]
        status, _, seen = await without_key.call("GET", f"/v1/files/{file_id}")

    assert status == 200 and seen["id"] == file_id
    stored = await storage.get_file(ids.parse_file_id(file_id), owner=models.ALL_OWNERS)
    assert stored.owner == "local"


# ------------------------------------------------------------------------------------- health and errors


async def test_health_readiness_and_metrics(
    http: aiohttp.ClientSession, api: RunningApi, registry: CollectorRegistry, alice: str
) -> None:
    Counter("fusillade_test_events", "A metric of the test.", registry=registry).inc(3)
    anonymous = Client(http, api, None)

    assert (await anonymous.call("GET", "/healthz"))[::2] == (200, {"status": "ok"})
    assert (await anonymous.call("GET", "/readyz"))[::2] == (200, {"status": "ready"})
    status, _, body = await anonymous.call("GET", "/metrics")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _, body = await Client(http, api, alice).call("GET", "/metrics")
    assert status == 403 and body["error"]["code"] == "permission_denied"
    for admin in (ADMIN_KEY, await create_key(api.storage, "ops", admin=True)):
        status, headers, text = await Client(http, api, admin).call("GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b"fusillade_test_events_total 3.0" in text


async def test_metrics_open_to_the_metrics_key_and_in_open_mode(
    http: aiohttp.ClientSession, storage: base.Storage
) -> None:
    metrics_key = f"fus_metrics-{uuid.uuid4().hex}"
    registry = CollectorRegistry()
    Counter("fusillade_test_events", "A metric of the test.", registry=registry).inc()
    async with running_api(storage, metrics_key=metrics_key, registry=registry) as api:
        status, _, text = await Client(http, api, metrics_key).call("GET", "/metrics")
        assert status == 200 and b"fusillade_test_events_total 1.0" in text
        status, _, body = await Client(http, api, metrics_key).call("GET", "/v1/files")
        assert status == 401, "the metrics key opened more than /metrics"
        status, _, body = await Client(http, api, metrics_key + "x").call("GET", "/metrics")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    async with running_api(storage, admin_key=None, open_owner="local", registry=registry) as api:
        status, _, text = await Client(http, api, None).call("GET", "/metrics")
        assert status == 200 and b"fusillade_test_events_total 1.0" in text


async def test_an_unavailable_database_answers_503_with_retry_after(
    http: aiohttp.ClientSession, storage: base.Storage
) -> None:
    flaky = FlakyStorage(storage)
    async with running_api(flaky.as_storage()) as api:
        key = await create_key(storage, "alice")
        client = Client(http, api, key)
        file_id = (await client.upload(request_lines(1)))["id"]
        batch_id = (await client.create_batch(file_id))["id"]
        flaky.down = True
        status, headers, body = await client.call("GET", f"/v1/batches/{batch_id}")
        ready_status, ready_headers, _ = await client.call("GET", "/readyz")
        flaky.down = False
        recovered, _, _ = await client.call("GET", f"/v1/batches/{batch_id}")

    assert status == 503
    assert headers["Retry-After"] == "1"
    assert "x-should-retry" not in headers
    assert_error(body, code="storage_unavailable")
    assert body["error"]["type"] == "server_error"
    assert (ready_status, ready_headers["Retry-After"]) == (503, "1")
    assert recovered == 200


async def test_unknown_paths_and_malformed_ids_answer_the_error_envelope(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)

    status, _, body = await client.call("GET", "/v1/fine_tuning/jobs")
    assert status == 404
    assert_error(body, code="not_found")
    status, _, body = await client.call("GET", "/v1/batches/batch_req_" + "0" * 32)
    assert status == 404
    assert_error(body, code="not_found")
    status, _, body = await client.call("PUT", "/v1/batches")
    assert status == 405
    assert_error(body, code="method_not_allowed")
    status, _, body = await client.call(
        "POST", "/v1/batches", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert body["error"]["code"] == "invalid_value"


def test_the_wire_fields_match_the_sdk_models() -> None:
    """Every field the installed SDK models is sent (a newer SDK that models more fields fails here first)."""
    from openai.types import Batch, FileObject

    assert set(FileObject.model_fields) <= FILE_FIELDS
    assert set(Batch.model_fields) <= BATCH_FIELDS
