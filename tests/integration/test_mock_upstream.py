"""The mock upstream over a real socket, driven by an aiohttp client the way fusillade's daemon drives it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from fusillade.mock_upstream import (
    Behaviour,
    ConnectionReset,
    EmbeddedError,
    FixedLatency,
    HttpError,
    MalformedEvent,
    MockUpstream,
    StallBeforeFirstByte,
    StallMidStream,
    TruncatedStream,
    reply_text,
)
from tests.support.polling import until

CHAT = "/v1/chat/completions"
STREAM = {"stream": True, "stream_options": {"include_usage": True}}


def chat(prompt: str = "hello", model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(
    session: aiohttp.ClientSession, upstream: MockUpstream, body: Any, path: str = CHAT, **headers: str
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """Status, JSON body and headers of one request."""
    async with session.post(upstream.url + path, data=orjson.dumps(body), headers=headers) as response:
        return response.status, orjson.loads(await response.read()), response.headers


async def read_events(response: aiohttp.ClientResponse, into: list[str]) -> None:
    """Append the data of each SSE event to `into` as it arrives."""
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif not line and data:
            into.append("\n".join(data))
            data = []


async def stream(session: aiohttp.ClientSession, upstream: MockUpstream, body: Any, path: str = CHAT) -> list[str]:
    events: list[str] = []
    async with session.post(upstream.url + path, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        await read_events(response, events)
    return events


# --------------------------------------------------------------------------------------------- answers


async def test_chat_completion_is_derived_from_the_request(
    upstream: MockUpstream, session: aiohttp.ClientSession
) -> None:
    status, body, headers = await post(session, upstream, chat("what is 2+2?", model="gpt-x"))
    assert status == 200
    assert body["model"] == "gpt-x"
    assert body["choices"][0]["message"]["content"] == reply_text("what is 2+2?")
    assert headers["x-request-id"].startswith("req_mock_")
    assert upstream.stats.requests_by_model == {"gpt-x": 1}
    assert upstream.stats.responses_by_status == {200: 1}


async def test_every_endpoint_answers(upstream: MockUpstream, session: aiohttp.ClientSession) -> None:
    _, completion, _ = await post(session, upstream, {"model": "m", "prompt": "p"}, "/v1/completions")
    _, embeddings, _ = await post(session, upstream, {"model": "e", "input": ["a", "b"]}, "/v1/embeddings")
    _, response, _ = await post(session, upstream, {"model": "r", "input": "q"}, "/v1/responses")
    assert completion["choices"][0]["text"] == reply_text("p")
    assert len(embeddings["data"]) == 2
    assert response["output"][0]["content"][0]["text"] == reply_text("q")
    assert upstream.stats.requests_by_path == {"/v1/completions": 1, "/v1/embeddings": 1, "/v1/responses": 1}


async def test_chat_stream_with_usage_ends_with_done(
    upstream: MockUpstream, session: aiohttp.ClientSession
) -> None:
    events = await stream(session, upstream, chat("hi") | STREAM)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[:-1]) == reply_text("hi")
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_completions_stream_ends_with_done(upstream: MockUpstream, session: aiohttp.ClientSession) -> None:
    events = await stream(session, upstream, {"model": "m", "prompt": "p", "stream": True}, "/v1/completions")
    assert events[-1] == "[DONE]"
    assert "usage" not in orjson.loads(events[-2])


async def test_responses_stream_sends_typed_events(upstream: MockUpstream, session: aiohttp.ClientSession) -> None:
    events = await stream(session, upstream, {"model": "m", "input": "q", "stream": True}, "/v1/responses")
    payloads = [orjson.loads(event) for event in events]
    assert payloads[0]["type"] == "response.created"
    assert payloads[-1]["type"] == "response.completed"
    assert payloads[-1]["response"]["output"][0]["content"][0]["text"] == reply_text("q")


async def test_the_stream_header_asks_for_a_stream_with_usage(
    upstream: MockUpstream, session: aiohttp.ClientSession
) -> None:
    async with session.post(upstream.url + CHAT, json=chat(), headers={"X-Fusillade-Stream": "true"}) as response:
        events: list[str] = []
        await read_events(response, events)
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["usage"] is not None


# ------------------------------------------------------------------------------------ refused requests


async def test_a_required_api_key_is_checked(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(api_key="sk-right")) as upstream:
        missing, missing_body, _ = await post(session, upstream, chat())
        wrong, _, _ = await post(session, upstream, chat(), Authorization="Bearer sk-wrong")
        right, _, _ = await post(session, upstream, chat(), Authorization="Bearer sk-right")
    assert (missing, wrong, right) == (401, 401, 200)
    assert missing_body["error"]["code"] == "invalid_api_key"
    assert set(missing_body["error"]) == {"message", "type", "param", "code"}


async def test_bad_requests_get_openai_errors(upstream: MockUpstream, session: aiohttp.ClientSession) -> None:
    unknown, unknown_body, _ = await post(session, upstream, chat(), "/v1/nothing")
    async with session.post(upstream.url + CHAT, data=b"{not json") as response:
        invalid, invalid_body = response.status, await response.json()
    no_model, _, _ = await post(session, upstream, {"messages": []})
    assert (unknown, invalid, no_model) == (404, 400, 400)
    assert "/v1/nothing" in unknown_body["error"]["message"]
    assert invalid_body["error"]["type"] == "invalid_request_error"
    assert upstream.stats.requests_total == 3


# ---------------------------------------------------------------------------------------- HTTP errors


async def test_error_rates_answer_with_the_status(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(error_rates={503: 1.0})) as upstream:
        status, body, _ = await post(session, upstream, chat())
    assert status == 503
    assert body["error"]["type"] == "server_error"
    assert upstream.stats.faults_by_kind == {"http_error": 1}
    assert upstream.stats.responses_by_status == {503: 1}


async def test_a_429_carries_retry_after(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(error_rates={429: 1.0}, retry_after_s=2, retry_after_ms=1500)) as upstream:
        status, body, headers = await post(session, upstream, chat())
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert headers["Retry-After"] == "2"
    assert headers["retry-after-ms"] == "1500"


async def test_a_scripted_custom_id_fails_then_succeeds(session: aiohttp.ClientSession) -> None:
    behaviour = Behaviour(faults_by_custom_id={"c7": [HttpError(500)]}, error_rates={429: 1.0})
    async with MockUpstream(behaviour) as upstream:
        first, _, _ = await post(session, upstream, chat(), **{"X-Fusillade-Custom-Id": "c7"})
        second, _, _ = await post(session, upstream, chat(), **{"X-Fusillade-Custom-Id": "c7"})
        other, _, _ = await post(session, upstream, chat(), **{"X-Fusillade-Custom-Id": "c8"})
    assert (first, second, other) == (500, 200, 429)
    arrivals = upstream.stats.attempts_by_custom_id["c7"]
    assert len(arrivals) == 2
    assert arrivals[0].monotonic <= arrivals[1].monotonic
    assert arrivals[0].wall <= arrivals[1].wall


async def test_fail_first_n_attempts(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fail_first_n_attempts=2), track_custom_ids=False) as upstream:
        statuses = [
            (await post(session, upstream, chat(), **{"X-Fusillade-Custom-Id": "c1"}))[0] for _ in range(3)
        ]
    assert statuses == [500, 500, 200]


async def test_seeded_faults_repeat_after_a_reset(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(error_rates={500: 0.5}, seed=42)) as upstream:
        first = [(await post(session, upstream, chat()))[0] for _ in range(16)]
        async with session.post(upstream.url + "/reset") as response:
            assert response.status == 204
        second = [(await post(session, upstream, chat()))[0] for _ in range(16)]
    assert first == second
    assert set(first) == {200, 500}


async def test_behaviour_changes_while_running(upstream: MockUpstream, session: aiohttp.ClientSession) -> None:
    before, _, _ = await post(session, upstream, chat())
    upstream.behaviour = Behaviour(error_rates={502: 1.0})
    after, _, _ = await post(session, upstream, chat())
    assert (before, after) == (200, 502)


# ----------------------------------------------------------------------------------- connection faults


async def test_a_connection_reset_sends_nothing(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={ConnectionReset(): 1.0})) as upstream:
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(session, upstream, chat())
        await until(lambda: upstream.stats.in_flight == 0, message="the reset request to leave")
    assert upstream.stats.faults_by_kind == {"connection_reset": 1}
    assert upstream.stats.responses_by_status == {}


async def test_latency_delays_the_answer(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(latency=FixedLatency(0.2))) as upstream:
        started = time.monotonic()
        status, _, _ = await post(session, upstream, chat())
    assert status == 200
    assert time.monotonic() - started >= 0.2


async def test_a_finite_stall_then_answers(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={StallBeforeFirstByte(0.2): 1.0})) as upstream:
        started = time.monotonic()
        status, _, _ = await post(session, upstream, chat())
    assert status == 200
    assert time.monotonic() - started >= 0.2


async def test_a_client_that_gives_up_leaves_the_in_flight_count(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={StallBeforeFirstByte(): 1.0})) as upstream:
        timeout = aiohttp.ClientTimeout(total=0.2)
        with pytest.raises(TimeoutError):
            async with session.post(upstream.url + CHAT, json=chat(), timeout=timeout):
                pass
        await until(lambda: upstream.stats.in_flight == 0, message="the aborted request to leave")
        assert upstream.stats.client_disconnects == 1
        assert upstream.stats.in_flight_by_model == {"m": 0}


async def test_maximum_in_flight_per_model(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={StallBeforeFirstByte(): 1.0})) as upstream:
        tasks = [
            asyncio.create_task(post(session, upstream, chat(model=model))) for model in ["a"] * 5 + ["b"] * 2
        ]
        await until(lambda: upstream.stats.in_flight == 7, message="7 requests in flight")
        assert upstream.stats.in_flight_by_model == {"a": 5, "b": 2}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: upstream.stats.in_flight == 0, message="every request to leave")
        assert upstream.stats.max_in_flight_by_model == {"a": 5, "b": 2}
        assert upstream.stats.max_in_flight == 7
        assert upstream.stats.client_disconnects == 7


async def test_close_ends_requests_stalled_forever(session: aiohttp.ClientSession) -> None:
    upstream = MockUpstream(Behaviour(fault_rates={StallBeforeFirstByte(): 1.0}))
    await upstream.start()
    request = asyncio.create_task(post(session, upstream, chat()))
    await until(lambda: upstream.stats.in_flight == 1, message="the request to arrive")
    started = time.monotonic()
    await upstream.close()
    assert time.monotonic() - started < 3
    with pytest.raises(aiohttp.ClientConnectionError):
        await request


# ---------------------------------------------------------------------------------------- stream faults


async def test_a_stall_mid_stream_after_k_events(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={StallMidStream(after_events=3): 1.0})) as upstream:
        events: list[str] = []
        async with session.post(upstream.url + CHAT, json=chat() | STREAM) as response:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await read_events(response, events)
        assert len(events) == 3
        await until(lambda: upstream.stats.in_flight == 0, message="the stalled stream to end")
        assert upstream.stats.client_disconnects == 1


async def test_a_truncated_stream_ends_without_done(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={TruncatedStream(after_events=2): 1.0})) as upstream:
        events: list[str] = []
        async with session.post(upstream.url + CHAT, json=chat() | STREAM) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_events(response, events)
    assert len(events) == 2
    assert "[DONE]" not in events


async def test_a_truncated_stream_always_lacks_its_end(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={TruncatedStream(after_events=1000): 1.0})) as upstream:
        events: list[str] = []
        async with session.post(upstream.url + "/v1/responses", json={"model": "m", "input": "q", **STREAM}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_events(r, events)
    assert orjson.loads(events[-1])["type"] == "response.output_item.done"


async def test_a_malformed_event_is_not_json(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={MalformedEvent(after_events=1): 1.0})) as upstream:
        events = await stream(session, upstream, chat() | STREAM)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(events[1])
    assert events[-1] == "[DONE]"


async def test_an_error_inside_a_200_stream(session: aiohttp.ClientSession) -> None:
    fault = EmbeddedError(after_events=2, status=503, message="overloaded")
    async with MockUpstream(Behaviour(fault_rates={fault: 1.0})) as upstream:
        events = await stream(session, upstream, chat() | STREAM)
    assert len(events) == 3
    assert orjson.loads(events[-1]) == {
        "error": {"message": "overloaded", "type": "server_error", "param": None, "code": 503}
    }
    assert upstream.stats.responses_by_status == {200: 1}
    assert upstream.stats.faults_by_kind == {"embedded_error": 1}


async def test_a_truncated_json_body(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(fault_rates={TruncatedStream(): 1.0})) as upstream:
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(session, upstream, chat())


async def test_stream_faults_on_json_answers(session: aiohttp.ClientSession) -> None:
    behaviour = Behaviour(
        faults_by_custom_id={
            "malformed": [MalformedEvent()],
            "embedded": [EmbeddedError(status=502)],
            "stalled": [StallMidStream(seconds=0.1)],
        }
    )
    async with MockUpstream(behaviour) as upstream:
        async with session.post(
            upstream.url + CHAT, json=chat(), headers={"X-Fusillade-Custom-Id": "malformed"}
        ) as r:
            malformed_status, malformed = r.status, await r.read()
        embedded = await post(session, upstream, chat(), **{"X-Fusillade-Custom-Id": "embedded"})
        stalled = await post(session, upstream, chat("s"), **{"X-Fusillade-Custom-Id": "stalled"})
    assert malformed_status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(malformed)
    assert embedded[0] == 200
    assert embedded[1]["error"]["code"] == 502
    assert stalled[0] == 200
    assert stalled[1]["choices"][0]["message"]["content"] == reply_text("s")


async def test_event_interval_spaces_the_events(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(Behaviour(event_interval_s=0.05)) as upstream:
        started = time.monotonic()
        events = await stream(session, upstream, chat() | STREAM)
    assert time.monotonic() - started >= 0.05 * (len(events) - 1)


# ---------------------------------------------------------------------------------- stats over HTTP


async def test_stats_and_reset_over_http(upstream: MockUpstream, session: aiohttp.ClientSession) -> None:
    headers = {
        "X-Fusillade-Custom-Id": "c1",
        "X-Fusillade-Batch-Id": "batch_1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Authorization": "Bearer sk-test",
        "X-Other": "not recorded",
    }
    await post(session, upstream, chat(), **headers)
    async with session.get(upstream.url + "/stats") as response:
        stats = await response.json()
    assert stats["requests_total"] == 1
    assert stats["responses_by_status"] == {"200": 1}
    assert list(stats["attempts_by_custom_id"]) == ["c1"]
    assert stats["recent_headers"] == [
        {name.lower(): value for name, value in headers.items() if name != "X-Other"}
    ]
    async with session.post(upstream.url + "/reset") as response:
        assert response.status == 204
    assert upstream.stats.requests_total == 0
    assert list(upstream.stats.recent_headers) == []


async def test_runs_as_a_subprocess_that_prints_its_url() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fusillade.mock_upstream",
        "--port",
        "0",
        "--error-rate",
        "418=1",
        "--latency-ms",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            async with session.post(url + CHAT, json=chat()) as response:
                assert response.status == 418
            async with session.get(url + "/stats") as response:
                assert (await response.json())["responses_by_status"] == {"418": 1}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
