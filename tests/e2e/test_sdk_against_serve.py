"""The official `openai` SDK, sync (`OpenAI`, run in a thread) and async (`AsyncOpenAI`), against `fusillade serve`
as a user runs it: a subprocess on SQLite whose models are routed to two `fusillade mock-upstream` subprocesses,
one fast that answers a seeded share of requests with a 400, one slow (30 s before any answer) to cancel against.

One deployment serves the whole module (starting the three processes is the slow part). The server runs without
API keys, so every object belongs to owner `local`: each test makes its own objects (custom ids carry a random
tag) and asserts on those only, never on the totals of the shared owner. On a failure, the processes' logs are
attached to the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import openai
import pytest
import pytest_asyncio
import yarl
from aiohttp import web
from multidict import CIMultiDict
from openai import AsyncOpenAI, OpenAI
from openai.types import Batch, FileObject

from tests.support import polling
from tests.support.processes import Processes

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT: Final = "/v1/chat/completions"
FAST_MODEL: Final = "chat"
"""Routed to the fast upstream, which answers 30 % of the requests (seeded) with a 400."""
SLOW_MODEL: Final = "slow"
"""Routed to the slow upstream: no answer within a test's lifetime."""
SDK_TIMEOUT: Final = 20.0
UPSTREAM_400: Final = {
    "message": "Mock upstream error 400.",
    "type": "invalid_request_error",
    "param": None,
    "code": None,
}
"""The error the fast upstream answers, as the error file must carry it."""
TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass
class Deployment:
    processes: Processes
    url: str
    fast_upstream: str
    slow_upstream: str

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    directory = tmp_path_factory.mktemp("serve")
    processes = Processes(directory)
    try:
        fast, slow = await asyncio.gather(
            processes.mock_upstream("--error-rate", "400=0.3", "--seed", "1", name="fast-upstream"),
            processes.mock_upstream("--latency-ms", "30000", name="slow-upstream"),
        )
        config = directory / "fusillade.toml"
        config.write_text(
            f'database_url = "sqlite:///{directory / "fusillade.db"}"\n\n'
            "[daemon]\n"
            'idle_poll_interval = "50ms"\n'
            'maintenance_interval = "100ms"\n'
            'cancellation_poll_interval = "50ms"\n'
            'shutdown_grace = "1s"\n\n'
            f'[models.{FAST_MODEL}]\nbase_url = "{fast}"\nconcurrency = 8\n\n'
            f'[models.{SLOW_MODEL}]\nbase_url = "{slow}"\nconcurrency = 2\n'
        )
        _, url = await processes.serve("--config", str(config))
        yield Deployment(processes, url, fast, slow)
    finally:
        await processes.stop()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which client of the SDK the test drives."""
    value: str = request.param
    return value


# ------------------------------------------------------------------------------------ the two SDK clients


class Sdk(Protocol):
    """The SDK calls the tests make, awaitable for both clients."""

    async def upload(self, content: bytes, *, filename: str = "requests.jsonl") -> FileObject: ...
    async def create_batch(self, file_id: str) -> Batch: ...
    async def retrieve_batch(self, batch_id: str) -> Batch: ...
    async def cancel_batch(self, batch_id: str) -> Batch: ...
    async def content(self, file_id: str) -> bytes: ...
    async def batches(self, *, limit: int) -> list[Batch]:
        """Every batch, the SDK following the pages."""

    async def input_files(self, *, limit: int) -> list[FileObject]:
        """Every input file (purpose `batch`), the SDK following the pages."""


class SyncSdk:
    """`openai.OpenAI`, each call in a worker thread so that the event loop (and the test's gateway) runs on."""

    def __init__(self, client: OpenAI) -> None:
        self._client = client

    async def upload(self, content: bytes, *, filename: str = "requests.jsonl") -> FileObject:
        return await asyncio.to_thread(self._client.files.create, file=(filename, content), purpose="batch")

    async def create_batch(self, file_id: str) -> Batch:
        return await asyncio.to_thread(
            self._client.batches.create, input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )

    async def retrieve_batch(self, batch_id: str) -> Batch:
        return await asyncio.to_thread(self._client.batches.retrieve, batch_id)

    async def cancel_batch(self, batch_id: str) -> Batch:
        return await asyncio.to_thread(self._client.batches.cancel, batch_id)

    async def content(self, file_id: str) -> bytes:
        return (await asyncio.to_thread(self._client.files.content, file_id)).content

    async def batches(self, *, limit: int) -> list[Batch]:
        return await asyncio.to_thread(lambda: list(self._client.batches.list(limit=limit)))

    async def input_files(self, *, limit: int) -> list[FileObject]:
        return await asyncio.to_thread(lambda: list(self._client.files.list(purpose="batch", limit=limit)))


class AsyncSdk:
    def __init__(self, client: AsyncOpenAI) -> None:
        self._client = client

    async def upload(self, content: bytes, *, filename: str = "requests.jsonl") -> FileObject:
        return await self._client.files.create(file=(filename, content), purpose="batch")

    async def create_batch(self, file_id: str) -> Batch:
        return await self._client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")

    async def retrieve_batch(self, batch_id: str) -> Batch:
        return await self._client.batches.retrieve(batch_id)

    async def cancel_batch(self, batch_id: str) -> Batch:
        return await self._client.batches.cancel(batch_id)

    async def content(self, file_id: str) -> bytes:
        return (await self._client.files.content(file_id)).content

    async def batches(self, *, limit: int) -> list[Batch]:
        return [batch async for batch in self._client.batches.list(limit=limit)]

    async def input_files(self, *, limit: int) -> list[FileObject]:
        return [file async for file in self._client.files.list(purpose="batch", limit=limit)]


@contextlib.asynccontextmanager
async def connect(kind: str, base_url: str) -> AsyncIterator[Sdk]:
    """The SDK's `kind` client, unchanged but for its `base_url` (default retries: 2)."""
    if kind == "sync":
        client = OpenAI(base_url=base_url, api_key="local", timeout=SDK_TIMEOUT)
        try:
            yield SyncSdk(client)
        finally:
            await asyncio.to_thread(client.close)
    else:
        async with AsyncOpenAI(base_url=base_url, api_key="local", timeout=SDK_TIMEOUT) as async_client:
            yield AsyncSdk(async_client)


# ----------------------------------------------------------------------------------------------- gateway

_NOT_FORWARDED: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
"""Hop-by-hop headers, and those the forwarding connection sets itself (bodies are streamed, chunked)."""
_CHUNK: Final = 64 * 1024


class Gateway:
    """A reverse proxy on 127.0.0.1 between the SDK and the server: forwards everything unchanged (headers such
    as `x-stainless-retry-count` included, bodies streamed) and records what passed. With `fail_first_create`,
    the first `POST /v1/batches` is forwarded, the server's answer read whole and thrown away, and the SDK gets
    a 500 instead: a gateway failing after the server committed the batch."""

    def __init__(self, target: str, *, fail_first_create: bool = False) -> None:
        self._target = target
        self._fail_next_create = fail_first_create
        self.seen: list[tuple[str, str, str | None]] = []
        """(method, path with query, x-stainless-retry-count) of every request."""
        self.swallowed: list[int] = []
        """Statuses of the server's answers replaced by a 500."""
        self.url = ""

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    async def __aenter__(self) -> Gateway:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(application, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs, request.headers.get("x-stainless-retry-count")))
        async with self._session.request(
            request.method,
            yarl.URL(self._target + request.raw_path, encoded=True),
            headers=_forwarded(request.headers),
            data=request.content.iter_chunked(_CHUNK) if request.body_exists else None,
            allow_redirects=False,
        ) as answer:
            if self._fail_next_create and (request.method, request.path) == ("POST", "/v1/batches"):
                self._fail_next_create = False
                await answer.read()
                self.swallowed.append(answer.status)
                error = {"message": "Bad gateway (test).", "type": "server_error", "param": None, "code": None}
                return web.json_response({"error": error}, status=500)
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            response.headers.extend(_forwarded(answer.headers))
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(_CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response


def _forwarded(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in _NOT_FORWARDED)


# ----------------------------------------------------------------------------------------------- helpers


def request_lines(custom_ids: list[str], *, model: str = FAST_MODEL) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": CHAT,
                "body": {"model": model, "messages": [{"role": "user", "content": f"hello {custom_id}"}]},
            }
        ).encode()
        + b"\n"
        for custom_id in custom_ids
    )


def new_ids(kind: str, label: str, count: int) -> list[str]:
    """Custom ids no other test uses (the upstreams count attempts per custom id across the module)."""
    tag = secrets.token_hex(4)
    return [f"{kind}-{label}-{tag}-{n}" for n in range(1, count + 1)]


def parsed(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.splitlines()]


async def until_status(sdk: Sdk, batch_id: str, wanted: str, *, within: float = 20) -> Batch:
    """Poll the batch until its status is `wanted`; fails at once on another final status."""

    async def reached() -> Batch | None:
        batch = await sdk.retrieve_batch(batch_id)
        if batch.status != wanted and batch.status in TERMINAL:
            raise AssertionError(f"The batch ended {batch.status!r}, not {wanted!r}: {batch}")
        return batch if batch.status == wanted else None

    batch = await polling.until(reached, within=within, interval=0.05, message=f"the batch to be {wanted}")
    assert batch is not None
    return batch


async def upstream_attempts(upstream: str, custom_ids: list[str]) -> dict[str, int]:
    """How many calls the mock upstream received for each of `custom_ids` (from its `GET /stats`)."""
    async with aiohttp.ClientSession() as http, http.get(f"{upstream}/stats") as response:
        arrivals = (await response.json())["attempts_by_custom_id"]
    return {custom_id: len(arrivals.get(custom_id, [])) for custom_id in custom_ids}


# ------------------------------------------------------------------------------------------------- tests


async def test_a_batch_completes_and_every_request_is_in_the_output_or_the_error_file_once(
    deployment: Deployment, kind: str
) -> None:
    custom_ids = new_ids(kind, "run", 24)
    content = request_lines(custom_ids)
    with deployment.processes.logs_on_failure():
        async with connect(kind, deployment.base_url) as sdk:
            uploaded = await sdk.upload(content)
            created = await sdk.create_batch(uploaded.id)
            done = await until_status(sdk, created.id, "completed")
            assert done.output_file_id is not None and done.error_file_id is not None, done
            output = parsed(await sdk.content(done.output_file_id))
            failed = parsed(await sdk.content(done.error_file_id))
            echoed = await sdk.content(uploaded.id)
        attempts = await upstream_attempts(deployment.fast_upstream, custom_ids)

        assert (uploaded.purpose, uploaded.status, uploaded.bytes) == ("batch", "processed", len(content))
        assert parsed(echoed) == parsed(content)
        assert created.status == "in_progress"
        assert created.request_counts is not None and created.request_counts.total == 24
        assert Counter(line["custom_id"] for line in output + failed) == Counter(custom_ids)
        assert output and failed, "the seeded upstream answers some requests 200 and some 400"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (len(output), len(failed))
        assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output)
        assert all(line["response"]["body"]["object"] == "chat.completion" for line in output)
        for line in failed:
            assert (line["response"]["status_code"], line["response"]["body"]) == (400, {"error": UPSTREAM_400})
            assert line["error"] is None
        assert attempts == dict.fromkeys(custom_ids, 1), "a 400 is final: never sent again"


async def test_a_batch_is_cancelled_while_its_requests_are_in_flight(deployment: Deployment, kind: str) -> None:
    custom_ids = new_ids(kind, "cancel", 4)
    with deployment.processes.logs_on_failure():
        async with connect(kind, deployment.base_url) as sdk:
            uploaded = await sdk.upload(request_lines(custom_ids, model=SLOW_MODEL))
            created = await sdk.create_batch(uploaded.id)

            async def in_flight() -> bool:
                attempts = await upstream_attempts(deployment.slow_upstream, custom_ids)
                return any(attempts.values())

            await polling.until(in_flight, within=10, interval=0.05, message="a call to reach the slow upstream")
            cancelling = await sdk.cancel_batch(created.id)
            done = await until_status(sdk, created.id, "cancelled", within=10)
            assert done.error_file_id is not None, done
            failed = parsed(await sdk.content(done.error_file_id))

        assert cancelling.status in ("cancelling", "cancelled")
        assert done.cancelled_at is not None and done.cancelling_at is not None
        assert done.request_counts is not None and done.request_counts.completed == 0
        assert Counter(line["custom_id"] for line in failed) == Counter(custom_ids)
        assert {line["error"]["code"] for line in failed} == {"batch_cancelled"}


async def test_lists_page_automatically_and_show_every_object_once(deployment: Deployment, kind: str) -> None:
    count = 7
    with deployment.processes.logs_on_failure():
        async with Gateway(deployment.url) as gateway, connect(kind, gateway.base_url) as sdk:
            files = [(await sdk.upload(request_lines(new_ids(kind, "page", 1)))).id for _ in range(count)]
            batches = [(await sdk.create_batch(file_id)).id for file_id in files]
            gateway.seen.clear()
            listed_batches = [batch.id for batch in await sdk.batches(limit=2)]
            listed_files = [file.id for file in await sdk.input_files(limit=2)]
            pages = [path for method, path, _ in gateway.seen if method == "GET"]
            async with connect(kind, deployment.base_url) as direct:
                one_page_of_files = [file.id for file in await direct.input_files(limit=10_000)]

        assert max(Counter(listed_batches).values()) == 1, listed_batches
        assert [batch_id for batch_id in listed_batches if batch_id in batches] == batches[::-1], "newest first"
        assert max(Counter(listed_files).values()) == 1, listed_files
        assert set(files) <= set(listed_files)
        assert listed_files == one_page_of_files
        batch_pages = [path for path in pages if path.startswith("/v1/batches?")]
        file_pages = [path for path in pages if path.startswith("/v1/files?")]
        assert len(batch_pages) >= (len(listed_batches) + 1) // 2 >= 4, batch_pages
        assert len(file_pages) >= (len(listed_files) + 1) // 2 >= 4, file_pages
        assert all("after=" in path for path in batch_pages[1:] + file_pages[1:]), pages


async def test_a_bad_file_is_refused_with_its_line_numbers(deployment: Deployment, kind: str) -> None:
    good = new_ids(kind, "bad", 3)
    content = (
        request_lines(good[:1])
        + b"this is not json\n"
        + request_lines(good[1:2])
        + b'{"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"}\n'
        + request_lines(good[2:], model="a-model-without-a-route")
    )
    filename = f"bad-{good[0]}.jsonl"
    with deployment.processes.logs_on_failure():
        async with connect(kind, deployment.base_url) as sdk:
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.upload(content, filename=filename)
            stored = [file.filename for file in await sdk.input_files(limit=10_000)]

        assert refused.value.status_code == 400
        message = refused.value.message
        for number in (2, 4, 5):
            assert f"line {number}:" in message, message
        for number in (1, 3):
            assert f"line {number}:" not in message, message
        assert "a-model-without-a-route" in message
        assert isinstance(refused.value.body, dict)
        assert [entry["line"] for entry in refused.value.body["lines"]] == [2, 4, 5]
        assert filename not in stored, "nothing is stored for a refused file"


async def test_an_sdk_retry_after_a_gateway_5xx_on_create_leaves_one_batch(
    deployment: Deployment, kind: str
) -> None:
    custom_ids = new_ids(kind, "retry", 3)
    with deployment.processes.logs_on_failure():
        async with connect(kind, deployment.base_url) as direct:
            uploaded = await direct.upload(request_lines(custom_ids))
            before = {batch.id for batch in await direct.batches(limit=100)}
            async with Gateway(deployment.url, fail_first_create=True) as gateway:
                async with connect(kind, gateway.base_url) as sdk:
                    batch = await sdk.create_batch(uploaded.id)
                creates = [
                    retry for method, path, retry in gateway.seen if (method, path) == ("POST", "/v1/batches")
                ]
            after = await direct.batches(limit=100)

        assert gateway.swallowed == [200], "the server made the batch; the gateway lost its answer"
        assert creates == ["0", "1"], "the SDK sent the create again, marked as a retry"
        assert {item.id for item in after} - before == {batch.id}
        assert [item.id for item in after if item.input_file_id == uploaded.id] == [batch.id]
        assert batch.request_counts is not None and batch.request_counts.total == 3
