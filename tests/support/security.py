"""Support of the security scenario (`tests/reliability/test_security.py`): an upstream that records every
call it gets (host, path, headers) and answers with bodies that carry a marker; API keys made by the CLI among
`tests.support.processes` processes; and readers of every stored value of a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from tests.support.processes import Processes

# ------------------------------------------------------------------------------------------- upstream


@dataclass(frozen=True)
class Call:
    """One request as the upstream received it."""

    host: str
    """The Host header."""
    path: str
    """The raw path, query included."""
    headers: Mapping[str, str]
    """Names in lower case."""
    body: bytes

    @property
    def custom_id(self) -> str | None:
        return self.headers.get("x-fusillade-custom-id")

    @property
    def model(self) -> object:
        return _json_object(self.body).get("model")


@dataclass
class RecordingUpstream:
    """An OpenAI-compatible upstream on 127.0.0.1 that accepts POSTs on any path, records each call, and answers
    by the custom id's prefix, every body carrying `marker`:

    - `client-error…`: 400, `server-error…`: 500 (every attempt), with the marker in the error message;
    - `rate-limited…`: 429 (`retry-after-ms: 10`, marker in the message) on the first attempt, then success;
    - `embedded-error…`: a 200 whose body is an error envelope with the marker;
    - `not-json…`: a 200 whose body is not JSON and holds the marker;
    - `stream-error…` (streamed requests): one event, then an error event with the marker;
    - `redirect…`: a 307 to the same path on `redirect_to`;
    - anything else: a chat completion whose text is the marker and the prompt (the request's own marker
      comes back), as JSON or, when the body asks for `stream`, as server-sent events.

    With `api_key`, a request without `Authorization: Bearer <api_key>` gets a 401."""

    marker: str = "upstream"
    api_key: str | None = None
    redirect_to: str = ""
    calls: list[Call] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _attempts: dict[str, int] = field(default_factory=dict)

    async def __aenter__(self) -> RecordingUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        call = Call(host=request.host, path=request.raw_path, headers=headers, body=body)
        self.calls.append(call)
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.")
        custom_id = call.custom_id or ""
        attempt = self._attempts.get(custom_id, 0)
        self._attempts[custom_id] = attempt + 1
        parsed = _json_object(body)
        if custom_id.startswith("redirect"):
            raise web.HTTPTemporaryRedirect(self.redirect_to + request.raw_path)
        if custom_id.startswith("client-error"):
            return _error(400, f"{self.marker}: the upstream refused this request")
        if custom_id.startswith("server-error"):
            return _error(500, f"{self.marker}: the upstream broke")
        if custom_id.startswith("rate-limited") and attempt == 0:
            return _error(429, f"{self.marker}: slow down", headers={"retry-after-ms": "10"})
        if custom_id.startswith("embedded-error"):
            envelope = {"error": {"message": f"{self.marker}: embedded", "type": "server_error", "code": 400}}
            return web.Response(body=orjson.dumps(envelope), content_type="application/json")
        if custom_id.startswith("not-json"):
            return web.Response(body=f"this is not JSON {self.marker}".encode(), content_type="application/json")
        text = f"{self.marker} answers: {_prompt(parsed)}"
        if parsed.get("stream") is True:
            return await self._stream(request, text, broken=custom_id.startswith("stream-error"))
        completion = {
            "id": "chatcmpl-recorded",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": parsed.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return web.Response(body=orjson.dumps(completion), content_type="application/json")

    async def _stream(self, request: web.Request, text: str, *, broken: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        head = {"id": "chatcmpl-recorded", "object": "chat.completion.chunk", "created": 0, "model": "m"}

        def event(payload: object) -> bytes:
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        first = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}
        await response.write(event(head | {"choices": [first]}))
        if broken:
            await response.write(event({"error": {"message": f"{self.marker}: mid-stream", "code": 500}}))
        else:
            last = {"index": 0, "delta": {}, "finish_reason": "stop"}
            await response.write(event(head | {"choices": [last]}))
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    envelope = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return web.Response(
        status=status, body=orjson.dumps(envelope), content_type="application/json", headers=headers
    )


def _json_object(body: bytes) -> dict[str, Any]:
    with contextlib.suppress(orjson.JSONDecodeError):
        value = orjson.loads(body)
        if isinstance(value, dict):
            return value
    return {}


def _prompt(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return ""


# ------------------------------------------------------------------------------------------ processes


async def create_key(fleet: Processes, config: Path, owner: str) -> tuple[str, str]:
    """`fusillade keys create --owner OWNER`: (the key, its id)."""
    code, stdout, stderr = await fleet.cli("keys", "create", "--owner", owner, "--config", str(config))
    assert code == 0, stderr
    found = re.search(r"id ([0-9a-f-]{36})", stderr)
    assert found is not None, stderr
    return stdout.splitlines()[-1], found.group(1)


async def together(*steps: Coroutine[Any, Any, Any]) -> list[Any]:
    """Run `steps` at once; their results in order. When one fails the others are cancelled (a cancelled
    command is killed), so nothing outlives the test."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(step) for step in steps]
    return [task.result() for task in tasks]


# ------------------------------------------------------------------------------------- stored values


@dataclass(frozen=True)
class Cell:
    table: str
    column: str
    value: str
    """The value as text (bytes decoded as latin-1, so that every byte sequence is searchable)."""


def sqlite_cells(path: Path) -> list[Cell]:
    """Every value of every column of every table (the schema's own tables included) of a SQLite file, read
    through a read-only connection (another process may hold it open)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        cells = []
        for table in [*tables, "sqlite_master"]:
            cursor = connection.execute(f'SELECT * FROM "{table}"')
            columns = [description[0] for description in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if value is not None:
                        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                        cells.append(Cell(table, column, text))
        return cells
    finally:
        connection.close()


async def postgres_cells(url: str) -> list[Cell]:
    """Every value of every column of every table outside PostgreSQL's own schemas, each as text."""
    connection = await asyncpg.connect(url)
    try:
        tables = await connection.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        cells = []
        for schema, table in tables:
            rows = await connection.fetch(f'SELECT to_jsonb(t) AS row FROM "{schema}"."{table}" t')
            for row in rows:
                for column, value in orjson.loads(row["row"]).items():
                    if value is not None:
                        cells.append(Cell(f"{schema}.{table}", column, str(value)))
        return cells
    finally:
        await connection.close()


def fragments(secret: str, length: int) -> set[str]:
    """Every substring of `secret` `length` characters long (the whole secret if it is shorter)."""
    if len(secret) <= length:
        return {secret}
    return {secret[start : start + length] for start in range(len(secret) - length + 1)}
