"""Scenario 6, hostile input, read from the logs: no user data in any log line at any level.

A hostile run against real processes at `--log-level debug` (`fusillade serve` on SQLite; `fusillade api` and
`fusillade daemon` on PostgreSQL), with a unique marker in every kind of value a user writes: custom_ids, model
names (served by the default route), bodies (values and keys), metadata keys and values, file names and
idempotency keys; and in what the upstream answers. The run mixes good requests, every failure the upstream
can make (4xx, 5xx, 429, an error inside a 200, a body that is not JSON, a broken stream, a redirect), refused
uploads (bad JSON, bytes that are not UTF-8, lone surrogates, control characters, a model name of 100,000
characters, a line over the line limit), refused creates (lone surrogates, NUL, deep nesting, huge numbers,
over-long keys), a retry, a cancel and deletions. Then every byte every process wrote is searched for every
marker.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support import backends, polling, security
from tests.support.processes import Processes

pytestmark = pytest.mark.reliability

CHAT = "/v1/chat/completions"
ADMIN_KEY_VARIABLE = "HOSTILE_LOGS_ADMIN_KEY"
TERMINAL = ("completed", "failed", "expired", "cancelled")
KINDS = (
    "custom-id",
    "model",
    "content",
    "body-key",
    "meta-key",
    "meta-value",
    "filename",
    "idempotency",
    "answer",
)


def config(upstream: str, database: str | None) -> str:
    route = f'base_url = "{upstream}/v1"\nconcurrency = 4\n'
    head = f'database_url = "{database}"\n' if database is not None else ""
    return f"""{head}
[auth]
admin_key_env = "{ADMIN_KEY_VARIABLE}"

[uploads]
max_line_bytes = "64KiB"

[daemon]
idle_poll_interval = "100ms"
maintenance_interval = "100ms"
cancellation_poll_interval = "50ms"
shutdown_grace = "1s"
batch_metadata_headers = ["team"]

[daemon.retry]
base_delay = "10ms"
max_delay = "50ms"
max_attempts = 2

[models.plain]
{route}
[models.streamed]
{route}stream = true

[models."*"]
{route}"""


class Caller:
    def __init__(self, http: aiohttp.ClientSession, url: str, key: str) -> None:
        self.http, self.url, self.key = http, url, key

    async def call(self, method: str, path: str, **options: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}", **options.pop("headers", {})}
        async with self.http.request(method, self.url + path, headers=headers, **options) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if response.content_type == "application/json" else raw

    async def upload(self, content: bytes, filename: str) -> tuple[int, Any]:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=filename, content_type="application/octet-stream")
        return await self.call("POST", "/v1/files", data=form)

    async def create(self, body: bytes, **headers: str) -> tuple[int, Any]:
        return await self.call(
            "POST", "/v1/batches", data=body, headers={"Content-Type": "application/json", **headers}
        )

    async def finished(self, batch_id: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status, batch = await self.call("GET", f"/v1/batches/{batch_id}")
            assert status == 200, batch
            return batch if batch["status"] in TERMINAL else None

        found = await polling.until(check, within=30, interval=0.05, message=f"batch {batch_id} to finish")
        assert found is not None
        return found


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield session


def request(marks: dict[str, str], custom_id: str, model: str) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"{marks['content']} asks"}],
        marks["body-key"]: 1,
    }
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}) + b"\n"


def hostile_lines(marks: dict[str, str]) -> list[bytes]:
    """Lines each refused, each holding markers."""
    good = request(marks, f"{marks['custom-id']}-again", "plain")
    return [
        b'{"custom_id": "' + marks["custom-id"].encode() + b'", "body": {' + marks["content"].encode() + b"}\n",
        request(marks, f"{marks['custom-id']}-bytes", "plain").replace(b" asks", b" \xff\xfe asks"),
        request(marks, f"{marks['custom-id']}-surrogate", "plain").replace(b" asks", rb" \ud800 asks"),
        request(marks, f"{marks['custom-id']}\x00nul", "plain"),
        request(marks, f"{marks['custom-id']}-long-model", marks["model"] * 20),
        request(marks, f"{marks['custom-id']}-very-long-model", marks["model"] * 6000),
        request(marks, f"{marks['custom-id']}-long-line", "plain").replace(
            b" asks", b" " + marks["content"].encode() * 4000
        ),
        request(marks, f"{marks['custom-id']}-deep", "plain").replace(
            b'"messages"', b'"' + marks["body-key"].encode() + b'":' + b"[" * 300 + b"]" * 300 + b',"messages"'
        ),
        good + good,  # a duplicate custom_id
        request(marks, f"{marks['custom-id']}-host", "plain").replace(CHAT.encode(), b"http://evil.example/v1/x"),
    ]


def hostile_creates(marks: dict[str, str], file_id: str) -> list[bytes]:
    """`POST /v1/batches` bodies each refused, each holding markers."""

    def body(**fields: Any) -> bytes:
        return orjson.dumps({"input_file_id": file_id, "endpoint": CHAT, **fields})

    key, value = marks["meta-key"], marks["meta-value"]
    return [
        body(metadata={key: value + "SURROGATE"}).replace(b"SURROGATE", rb"\ud800"),
        body(metadata={key + "SURROGATE": value}).replace(b"SURROGATE", rb"\udfff"),
        body(metadata={key: value + "\x00"}),
        body(metadata={key: value * 40}),
        body(metadata={key * 5: value}),
        body(metadata={key: value})[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        body(metadata={key: value})[:-1] + b',"x":' + b"1" * 5000 + b"}",
        body(metadata={key: value}).replace(value.encode(), value.encode() + b"\xff"),
        body(metadata={key: value}, completion_window=value),
        body(metadata={key: value}, endpoint="/v1/" + value),
        body(metadata={key: value}).replace(file_id.encode(), b"file-" + value.encode()),
    ]


async def test_no_user_data_reaches_any_log_line(
    backend: backends.Backend, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    run = uuid.uuid4().hex[:12]
    marks = {kind: f"mk{kind.replace('-', '')}{run}" for kind in KINDS}
    environment = {ADMIN_KEY_VARIABLE: f"fus_admin-{uuid.uuid4().hex}"}
    database = None if backend.is_postgres else f"sqlite:///{backend.location}"
    if backend.is_postgres:
        environment["FUSILLADE_DATABASE_URL"] = backend.location
    async with (
        security.RecordingUpstream(marker=marks["answer"]) as upstream,
        Processes(tmp_path, environment=environment) as fleet,
    ):
        path = tmp_path / "fusillade.toml"
        path.write_text(config(upstream.url, database))
        arguments = ("--config", str(path), "--log-level", "debug")
        if backend.is_postgres:
            fleet.start("daemon", "daemon", *arguments)
            started = fleet.serve(*arguments, command="api")
        else:
            started = fleet.serve(*arguments)
        (_, url), (key, _) = await security.together(started, security.create_key(fleet, path, "alice"))
        alice = Caller(http, url, key)

        marked_id = marks["custom-id"]
        failing = ["client-error", "server-error", "rate-limited", "embedded-error", "not-json", "redirect"]
        content = b"".join(
            [
                request(marks, f"ok-{marked_id}", "plain"),
                request(marks, f"ok-stream-{marked_id}", "streamed"),
                request(marks, f"ok-default-{marked_id}", marks["model"]),
                request(marks, f"stream-error-{marked_id}", "streamed"),
                *(request(marks, f"{prefix}-{marked_id}", "plain") for prefix in failing),
            ]
        )
        status, uploaded = await alice.upload(content, f"{marks['filename']}.jsonl")
        assert status == 200, uploaded
        for hostile in hostile_lines(marks):
            status, refused = await alice.upload(request(marks, "fine", "plain") + hostile, marks["filename"])
            assert (status, refused["error"]["code"]) == (400, "invalid_file"), refused
        for hostile in hostile_creates(marks, uploaded["id"]):
            status, refused = await alice.create(hostile)
            assert status in (400, 404), refused
        status, refused = await alice.create(b"{}", **{"Idempotency-Key": marks["idempotency"] * 20})
        assert status == 400, refused

        good_create = orjson.dumps(
            {
                "input_file_id": uploaded["id"],
                "endpoint": CHAT,
                "metadata": {"team": marks["meta-value"], marks["meta-key"]: marks["meta-value"]},
            }
        )
        status, batch = await alice.create(good_create, **{"Idempotency-Key": marks["idempotency"]})
        assert status == 200, batch
        done = await alice.finished(batch["id"])
        status, retried = await alice.call("POST", f"/v1/batches/{batch['id']}/retry")
        assert status == 200, retried
        await alice.finished(batch["id"])
        status, other = await alice.create(good_create)
        assert status == 200, other
        assert (await alice.call("POST", f"/v1/batches/{other['id']}/cancel"))[0] == 200
        for file_id in (done["output_file_id"], done["error_file_id"], uploaded["id"]):
            assert (await alice.call("DELETE", f"/v1/files/{file_id}"))[0] == 200
        for process in fleet.started:
            assert await process.stop() == 0, process.output()[-4000:]

    assert done["request_counts"]["completed"] >= 4, done
    assert any(marks["content"].encode() in call.body for call in upstream.calls), "the markers reached upstream"
    logged = {
        f"{process.name} {path.suffix}": path.read_bytes()
        for process in fleet.started
        for path in (process.log, process.stdout)
        if path.exists()
    }
    assert any(b"upstream call for" in data for data in logged.values()), "no debug line: is the log level debug?"
    leaks = [
        f"{name}: {text.decode(errors='replace')[:300]}"
        for name, data in logged.items()
        for text in data.splitlines()
        if any(mark.encode() in text for mark in marks.values())
    ]
    assert leaks == [], "\n".join(leaks[:20])
