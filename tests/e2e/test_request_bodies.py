"""The upstream gets the body the user wrote: each line's `body` bytes, validated but never re-serialised, through
the HTTP API, the storage (SQLite and PostgreSQL) and the daemon; a streaming route adds only its own fields.

Numbers beyond 64 bits and below a double's range, `\\u` escapes (a NUL among them), key order, duplicate keys
and spacing all reach the upstream as written. A lone surrogate escape (`"\\ud800"`, valid JSON grammar but no
character) is refused at upload with its line, on both backends, so that no store or upstream ever sees one.
"""

from __future__ import annotations

from typing import Any, Final

import aiohttp
import orjson
from openai import AsyncOpenAI

from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from tests.integration.conftest import running
from tests.support import polling
from tests.support.api_server import ROUTED_MODELS, create_key, running_api
from tests.support.security import RecordingUpstream

CHAT: Final = "/v1/chat/completions"
BODIES: Final = {
    "big-numbers": b'{"model": "MODEL", "seed": 18446744073709551616, "temperature": 1e-99999, "top_p": 1.50,'
    b' "n": -0, "messages": [{"role": "user", "content": "as written"}]}',
    "escapes": b'{"messages":[{"role":"user","content":"caf\\u00e9 \\ud83d\\ude00 \\u0000 \\/ \\"q\\""}],'
    b'"model":"MODEL"}',
    "key-order-and-space": b'{ "z": 1 ,\t"messages" : [ {"content": "x", "role": "user"} ] , "a": { } ,'
    b' "model" : "MODEL" }',
    "duplicate-keys": b'{"model": "MODEL", "messages": [{"role": "user", "content": "one"}], "user": "first",'
    b' "user": "second"}',
    "stream-false": b'{"model": "MODEL", "stream": false, "messages": [{"role": "user", "content": "s"}],'
    b' "stream_options": {"include_usage": false, "x": 2}}',
}


def line(custom_id: str, body: bytes) -> bytes:
    return b'{"custom_id": "%s", "method": "POST", "url": "%s", "body": %s}\n' % (
        custom_id.encode(),
        CHAT.encode(),
        body,
    )


def for_model(body: bytes, model: str) -> bytes:
    return body.replace(b"MODEL", model.encode())


async def test_the_upstream_gets_each_body_byte_for_byte(storage: base.Storage, client: UpstreamClient) -> None:
    plain, streamed = sorted(ROUTED_MODELS)
    content = b"".join(
        line(f"{name}-{model}", for_model(body, model))
        for name, body in BODIES.items()
        for model in (plain, streamed)
    )
    async with RecordingUpstream() as upstream:
        routes = {
            plain: Route(base_url=upstream.url + "/v1", concurrency=4),
            streamed: Route(base_url=upstream.url + "/v1", concurrency=4, stream=True),
        }
        async with (
            running(storage, client, routes) as daemon,
            running_api(storage, notify_work=daemon.notify_work) as api,
        ):
            key = await create_key(storage, "alice")
            async with AsyncOpenAI(base_url=api.base_url, api_key=key, max_retries=0) as sdk:
                uploaded = await sdk.files.create(file=("bodies.jsonl", content), purpose="batch")
                downloaded = (await sdk.files.content(uploaded.id)).content
                batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="1h")

                async def completed() -> Any:
                    current = await sdk.batches.retrieve(batch.id)
                    return current if current.status == "completed" else None

                done = await polling.until(completed, within=30, message="the batch to complete")
        calls = {call.custom_id: call.body for call in upstream.calls}

    assert done.request_counts.completed == len(BODIES) * 2, done
    for name, body in BODIES.items():
        assert calls[f"{name}-{plain}"] == for_model(body, plain), name
        sent = calls[f"{name}-{streamed}"]
        written = for_model(body, streamed)
        if b'"stream' not in written:
            fields = b',"stream":true,"stream_options":{"include_usage":true}}'
            assert sent == written[:-1] + fields, name
    assert calls[f"stream-false-{streamed}"] == for_model(BODIES["stream-false"], streamed).replace(
        b"false", b"true"
    ), "the user's stream fields are overridden in place, the rest kept"
    # The input file gives back each body as written (the other fields of a line are written compactly).
    assert [orjson.loads(item)["body"] for item in downloaded.splitlines()] == [
        orjson.loads(for_model(body, model)) for body in BODIES.values() for model in (plain, streamed)
    ]
    for body in BODIES.values():
        assert b',"body":' + for_model(body, plain) + b"}" in downloaded


async def test_a_lone_surrogate_escape_in_a_body_is_refused_at_upload(storage: base.Storage) -> None:
    good = line("good", for_model(BODIES["big-numbers"], "model-a"))
    lone = line("lone", b'{"model": "model-a", "messages": [{"role": "user", "content": "\\ud800 alone"}]}')
    reversed_pair = line(
        "pair", b'{"model": "model-a", "messages": [{"role": "user", "content": "\\udc00\\ud800"}]}'
    )
    async with running_api(storage) as api, aiohttp.ClientSession() as http:
        key = await create_key(storage, "alice")
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", good + lone + reversed_pair, filename="surrogates.jsonl")
        async with http.post(
            api.url + "/v1/files", data=form, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            status, answer = response.status, await response.json()
    assert status == 400
    assert answer["error"]["code"] == "invalid_file"
    assert [item["line"] for item in answer["error"]["lines"]] == [2, 3]
    assert all("surrogate" in item["message"] for item in answer["error"]["lines"]), answer
    assert (await storage.list_files(owner="alice")).items == []
