"""The HTTP API over a real socket with a raw HTTP client (aiohttp), each test once per backend: envelopes,
status codes and headers, idempotent creates, streamed downloads, refused uploads, and the extras. Tenancy,
authentication, health and the error envelope of unknown paths are in `test_api_access.py`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from fusillade.domain import ids, models
from tests.e2e.api_client import CHAT, Client, assert_error, bearer, form, request_lines
from tests.e2e.conftest import MAX_BYTES
from tests.support import factories
from tests.support.api_server import RunningApi

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
    "requests_without_usage",  # fusillade extras
    "cost",
    "budget",
}
LIST_FIELDS = {"object", "data", "first_id", "last_id", "has_more"}


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


def test_the_wire_fields_match_the_sdk_models() -> None:
    """Every field the installed SDK models is sent (a newer SDK that models more fields fails here first)."""
    from openai.types import Batch, FileObject

    assert set(FileObject.model_fields) <= FILE_FIELDS
    assert set(Batch.model_fields) <= BATCH_FIELDS
