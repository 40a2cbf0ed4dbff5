"""Calling the HTTP API with a raw HTTP client (aiohttp), for the API tests: `Client` makes the requests of one
caller, `request_lines` and `form` make the upload, `assert_error` checks the error envelope."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tests.support import factories
from tests.support.api_server import RunningApi

CHAT = factories.CHAT


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
