"""The upstream client (`upstream.client`) against small aiohttp servers on 127.0.0.1, one per test, each doing
exactly what the test needs: what is sent (URL, headers, body), what each answer becomes, the phase timers, and
that a cancelled call lets go of the server at once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import orjson
import pytest
from aiohttp import web

from fusillade.domain import ids, models
from fusillade.domain.usage import usage_in
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.outcome import Permanent, Retriable, Success
from fusillade.upstream.routes import PhaseTimeouts, Route
from tests.support import polling

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable["Server"]]

CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": None}
FAST = PhaseTimeouts(
    connect=timedelta(seconds=2),
    first_byte=timedelta(seconds=0.3),
    idle=timedelta(seconds=0.3),
    total=timedelta(seconds=10),
)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    url: str = ""
    received: list[Received] = field(default_factory=list)
    peers: list[object] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a handler was cancelled, or failed to write, because the client went away."""


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Server:
        server = Server()

        async def recorded(request: web.Request) -> web.StreamResponse:
            server.received.append(Received(request.path, dict(request.headers), await request.read()))
            server.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
            try:
                return await handler(request)
            except (asyncio.CancelledError, ConnectionResetError):
                server.aborted.set()
                raise

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", recorded)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http_client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def claimed(*, url: str = CHAT_PATH, body: Any = CHAT_BODY, custom_id: str = "line-1") -> models.ClaimedRequest:
    now = datetime.now(UTC)
    return models.ClaimedRequest(
        id=ids.new_request_id(),
        batch_id=ids.new_batch_id(),
        owner="owner",
        custom_id=custom_id,
        model="m",
        method="POST",
        url=url,
        body=orjson.dumps(body).decode(),
        attempt=0,
        deadline=now + timedelta(hours=1),
        daemon_id=ids.DaemonId(uuid.uuid4()),
        claimed_at=now,
    )


def route(server: Server, **options: Any) -> Route:
    return Route(base_url=server.url, **{"timeouts": FAST, **options})


def json_answer(document: Any, status: int = 200, **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status, body=orjson.dumps(document), content_type="application/json", headers=headers
        )

    return handler


def sse_answer(*events: Any, done: bool = True, pause: float = 0.0) -> Handler:
    """A stream of `data:` events (dicts are sent as JSON), then `[DONE]` unless told otherwise."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for item in [*events, *(["[DONE]"] if done else [])]:
            data = item if isinstance(item, str) else orjson.dumps(item).decode()
            await response.write(f"data: {data}\n\n".encode())
            if pause:
                await asyncio.sleep(pause)
        await response.write_eof()
        return response

    return handler


async def forever() -> NoReturn:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def chat_chunk(**delta: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": delta.pop("finish_reason", None)}
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}


# ---------------------------------------------------------------------------------------- what is sent


async def test_a_json_answer_is_a_success_and_the_request_is_sent_as_specified(
    serve: Serve, http_client: UpstreamClient
) -> None:
    server = await serve(json_answer(COMPLETION))
    request = claimed()
    extra = {"x-fusillade-batch-endpoint": CHAT_PATH, "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    extra["authorization"] = "Bearer stolen"  # the caller cannot replace the client's own headers

    outcome = await http_client.send(request, route(server, api_key="sk-test"), headers=extra)

    assert outcome == Success(status_code=200, body=orjson.dumps(COMPLETION).decode(), usage=usage_in(COMPLETION))
    [received] = server.received
    assert received.path == CHAT_PATH
    assert orjson.loads(received.body) == CHAT_BODY
    headers = {name.lower(): value for name, value in received.headers.items()}
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["content-type"] == "application/json"
    assert headers["x-fusillade-request-id"] == ids.request_wire(request.id)
    assert headers["x-fusillade-batch-id"] == ids.batch_wire(request.batch_id)
    assert headers["x-fusillade-custom-id"] == "line-1"
    assert headers["x-fusillade-batch-endpoint"] == CHAT_PATH
    assert headers["traceparent"] == extra["traceparent"]


async def test_no_authorization_without_a_key(serve: Serve, http_client: UpstreamClient) -> None:
    server = await serve(json_answer(COMPLETION))
    await http_client.send(claimed(), route(server))
    assert "authorization" not in {name.lower() for name in server.received[0].headers}


@pytest.mark.parametrize("custom_id", ["line\n1", "line\r\nX-Evil: 1", "ligne-é", "x" * 300, " padded", ""])
async def test_an_unsafe_custom_id_is_not_sent_as_a_header(
    serve: Serve, http_client: UpstreamClient, custom_id: str
) -> None:
    server = await serve(json_answer(COMPLETION))
    outcome = await http_client.send(claimed(custom_id=custom_id), route(server))
    assert isinstance(outcome, Success)
    names = {name.lower() for name in server.received[0].headers}
    assert "x-fusillade-custom-id" not in names
    assert "x-evil" not in names


@pytest.mark.parametrize("base", ["/v1", "/v1/", ""])
async def test_a_v1_base_url_is_joined_once(serve: Serve, http_client: UpstreamClient, base: str) -> None:
    server = await serve(json_answer(COMPLETION))
    await http_client.send(claimed(), Route(base_url=server.url + base, timeouts=FAST))
    assert server.received[0].path == CHAT_PATH


async def test_the_host_never_comes_from_the_request(serve: Serve, http_client: UpstreamClient) -> None:
    server = await serve(json_answer(COMPLETION))
    outcome = await http_client.send(claimed(url="http://169.254.169.254/v1/chat/completions"), route(server))
    assert isinstance(outcome, Success)
    assert server.received[0].path == "/http://169.254.169.254/v1/chat/completions"


async def test_an_invalid_header_from_the_caller_is_a_permanent_failure(
    serve: Serve, http_client: UpstreamClient
) -> None:
    server = await serve(json_answer(COMPLETION))
    outcome = await http_client.send(claimed(), route(server), headers={"x-fusillade-batch-id-2": "a\nb"})
    assert isinstance(outcome, Permanent)
    assert outcome.code == "invalid_request"
    assert server.received == []


async def test_connections_are_kept_alive(serve: Serve, http_client: UpstreamClient) -> None:
    server = await serve(json_answer(COMPLETION))
    for _ in range(3):
        assert isinstance(await http_client.send(claimed(), route(server)), Success)
    assert len(set(server.peers)) == 1


# ---------------------------------------------------------------------------------------- answers


async def test_a_500_is_retriable_with_its_body(serve: Serve, http_client: UpstreamClient) -> None:
    error = {"error": {"message": "boom", "type": "server_error"}}
    server = await serve(json_answer(error, status=500))
    outcome = await http_client.send(claimed(), route(server))
    assert outcome == Retriable(
        code="http_500",
        message="The upstream answered HTTP 500: boom.",
        status_code=500,
        body=orjson.dumps(error).decode(),
    )


@pytest.mark.parametrize(
    ("headers", "delay"),
    [({"Retry-After": "2"}, timedelta(seconds=2)), ({"retry-after-ms": "250"}, timedelta(milliseconds=250))],
)
async def test_a_429_carries_the_delay_asked(
    serve: Serve, http_client: UpstreamClient, headers: dict[str, str], delay: timedelta
) -> None:
    server = await serve(json_answer({"error": {"message": "slow down"}}, status=429, **headers))
    outcome = await http_client.send(claimed(), route(server))
    assert isinstance(outcome, Retriable)
    assert (outcome.code, outcome.status_code, outcome.retry_after) == ("http_429", 429, delay)


async def test_a_400_is_permanent(serve: Serve, http_client: UpstreamClient) -> None:
    server = await serve(json_answer({"error": {"message": "bad model"}}, status=400))
    outcome = await http_client.send(claimed(), route(server))
    assert isinstance(outcome, Permanent)
    assert (outcome.code, outcome.status_code, outcome.message) == (
        "http_400",
        400,
        "The upstream answered HTTP 400: bad model.",
    )


async def test_a_redirect_is_not_followed(serve: Serve, http_client: UpstreamClient) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("http://example.invalid/steal")

    server = await serve(redirect)
    outcome = await http_client.send(claimed(), route(server, api_key="sk-test"))
    assert isinstance(outcome, Permanent)
    assert outcome.code == "http_302"


async def test_a_2xx_that_is_not_json_is_stored_as_a_json_string(
    serve: Serve, http_client: UpstreamClient
) -> None:
    async def text(request: web.Request) -> web.StreamResponse:
        return web.Response(text="just words")

    server = await serve(text)
    outcome = await http_client.send(claimed(), route(server))
    assert outcome == Success(status_code=200, body='"just words"', usage=None)


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_cap_is_permanent(serve: Serve, chunked: bool) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=b"x" * 5000)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(5):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    server = await serve(big)
    async with UpstreamClient(max_response_bytes=4096) as client:
        outcome = await client.send(claimed(), route(server))
    assert outcome == Permanent(
        code="response_too_large", message="The upstream response is larger than 4096 bytes."
    )


async def test_connection_refused_is_a_connection_error(http_client: UpstreamClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = await http_client.send(claimed(), Route(base_url=f"http://127.0.0.1:{port}", timeouts=FAST))
    assert isinstance(outcome, Retriable)
    assert outcome.code == "connection_error"


async def test_a_reset_before_the_answer_is_a_connection_error(serve: Serve, http_client: UpstreamClient) -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await forever()

    server = await serve(reset)
    outcome = await http_client.send(claimed(), route(server))
    assert isinstance(outcome, Retriable)
    assert outcome.code == "connection_error"


# ---------------------------------------------------------------------------------------- streams


async def test_a_tool_call_stream_is_reassembled_and_asked_for_with_usage(
    serve: Serve, http_client: UpstreamClient
) -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    server = await serve(
        sse_answer(
            chat_chunk(role="assistant", content=None, tool_calls=[call]),
            chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"q":'}}]),
            chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": ' "x"}'}}]),
            chat_chunk(finish_reason="tool_calls"),
            {"id": "chatcmpl-9", "choices": [], "usage": usage},
        )
    )
    request = claimed(body={**CHAT_BODY, "stream_options": {"other": 1}})

    outcome = await http_client.send(request, route(server, stream=True))

    assert isinstance(outcome, Success)
    body = orjson.loads(outcome.body)
    assert body["object"] == "chat.completion"
    assert body["usage"] == usage
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    ]
    sent = orjson.loads(server.received[0].body)
    assert sent == {**CHAT_BODY, "stream": True, "stream_options": {"other": 1, "include_usage": True}}


async def test_a_responses_stream_asks_only_for_stream(serve: Serve, http_client: UpstreamClient) -> None:
    response = {"id": "resp_1", "object": "response", "status": "completed", "output": []}
    server = await serve(sse_answer({"type": "response.completed", "response": response}, done=False))
    body = {"model": "m", "input": "hi"}
    outcome = await http_client.send(claimed(url="/v1/responses", body=body), route(server, stream=True))
    assert outcome == Success(status_code=200, body=orjson.dumps(response).decode(), usage=usage_in(response))
    assert orjson.loads(server.received[0].body) == {**body, "stream": True}


@pytest.mark.parametrize("content_type", ["text/event-stream", "Text/Event-Stream ; charset=UTF-8"])
async def test_an_unasked_stream_is_reassembled_whatever_the_media_type_spelling(
    serve: Serve, http_client: UpstreamClient, content_type: str
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for event in (chat_chunk(role="assistant", content="Hel"), chat_chunk(content="lo", finish_reason="stop")):
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    server = await serve(handler)
    outcome = await http_client.send(claimed(), route(server))  # a route that does not ask for a stream
    assert isinstance(outcome, Success)
    assert orjson.loads(outcome.body)["choices"][0]["message"]["content"] == "Hello"


async def test_a_streaming_route_takes_a_plain_json_answer_too(serve: Serve, http_client: UpstreamClient) -> None:
    server = await serve(json_answer(COMPLETION))
    outcome = await http_client.send(claimed(), route(server, stream=True))
    assert outcome == Success(status_code=200, body=orjson.dumps(COMPLETION).decode(), usage=usage_in(COMPLETION))


@pytest.mark.parametrize(
    ("error", "kind"),
    [({"message": "overloaded", "code": "server_error"}, Retriable), ({"message": "no", "code": 400}, Permanent)],
)
async def test_an_error_inside_a_200_stream_is_an_upstream_error(
    serve: Serve, http_client: UpstreamClient, error: dict[str, Any], kind: type[Retriable | Permanent]
) -> None:
    server = await serve(sse_answer(chat_chunk(content="Hel"), {"error": error}))
    outcome = await http_client.send(claimed(), route(server, stream=True))
    assert isinstance(outcome, kind)
    assert outcome.code == "upstream_error"
    assert orjson.loads(outcome.body or "null") == {"error": error}


async def test_a_stream_without_done_is_a_stream_error(serve: Serve, http_client: UpstreamClient) -> None:
    server = await serve(sse_answer(chat_chunk(content="Hel"), done=False))
    outcome = await http_client.send(claimed(), route(server, stream=True))
    assert isinstance(outcome, Retriable)
    assert outcome.code == "stream_error"
    assert "[DONE]" in outcome.message


async def test_a_malformed_stream_is_a_stream_error(serve: Serve, http_client: UpstreamClient) -> None:
    server = await serve(sse_answer(chat_chunk(content="Hel"), '{"choices": [truncated'))
    outcome = await http_client.send(claimed(), route(server, stream=True))
    assert isinstance(outcome, Retriable)
    assert outcome.code == "stream_error"


async def test_a_reset_mid_stream_is_a_stream_error(serve: Serve, http_client: UpstreamClient) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + orjson.dumps(chat_chunk(content="Hel")) + b"\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    server = await serve(cut)
    outcome = await http_client.send(claimed(), route(server, stream=True))
    assert isinstance(outcome, Retriable)
    assert outcome.code == "stream_error"


# ---------------------------------------------------------------------------------------- timers


async def test_no_headers_in_time_is_a_first_byte_timeout(serve: Serve, http_client: UpstreamClient) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await forever()

    server = await serve(stall)
    outcome = await http_client.send(claimed(), route(server))
    assert outcome == Retriable(code="timeout", message="first_byte timeout: no response headers within 0.3 s.")
    await polling.until(server.aborted.is_set, within=5, message="the server to see the call abandoned")


async def test_no_first_event_in_time_is_a_first_byte_timeout(serve: Serve, http_client: UpstreamClient) -> None:
    async def pings(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:  # comments keep the connection busy but are not events
            await response.write(b": ping\n\n")
            await asyncio.sleep(0.05)

    server = await serve(pings)
    outcome = await http_client.send(claimed(), route(server, stream=True))
    assert outcome == Retriable(code="timeout", message="first_byte timeout: no first SSE event within 0.3 s.")


async def test_a_stall_mid_stream_is_an_idle_timeout(serve: Serve, http_client: UpstreamClient) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + orjson.dumps(chat_chunk(content="Hel")) + b"\n\n")
        await forever()

    server = await serve(stall)
    outcome = await http_client.send(claimed(), route(server, stream=True))
    assert outcome == Retriable(code="timeout", message="idle timeout: no next SSE event within 0.3 s.")


async def test_a_slow_stream_hits_the_total_timeout(serve: Serve, http_client: UpstreamClient) -> None:
    events = [chat_chunk(content=str(n)) for n in range(100)]
    server = await serve(sse_answer(*events, pause=0.05))
    timeouts = PhaseTimeouts(
        first_byte=timedelta(seconds=2), idle=timedelta(seconds=2), total=timedelta(seconds=0.5)
    )
    outcome = await http_client.send(claimed(), route(server, stream=True, timeouts=timeouts))
    assert outcome == Retriable(code="timeout", message="total timeout: the call took more than 0.5 s.")


async def test_a_connection_that_cannot_be_made_is_a_connect_timeout(http_client: UpstreamClient) -> None:
    # A listening socket that never accepts, its backlog filled: the kernel drops further connection attempts.
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(address)
        timeouts = PhaseTimeouts(connect=timedelta(seconds=0.2), first_byte=timedelta(seconds=5))
        outcome = await http_client.send(
            claimed(), Route(base_url=f"http://{address[0]}:{address[1]}", timeouts=timeouts)
        )
    assert outcome == Retriable(code="timeout", message="connect timeout: no connection within 0.2 s.")


# ---------------------------------------------------------------------------------------- cancellation


async def _cancel_when_received(client: UpstreamClient, server: Server, target: Route) -> None:
    task = asyncio.create_task(client.send(claimed(), target))
    await polling.until(lambda: server.received, within=5, message="the request to arrive")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await polling.until(server.aborted.is_set, within=2, message="the server to see the call aborted")


async def test_cancelling_a_call_waiting_for_headers_aborts_it_on_the_server(
    serve: Serve, http_client: UpstreamClient
) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await forever()

    server = await serve(stall)
    slow = PhaseTimeouts(first_byte=timedelta(seconds=30), idle=timedelta(seconds=30))
    await _cancel_when_received(http_client, server, route(server, timeouts=slow))


async def test_cancelling_a_call_mid_stream_aborts_it_on_the_server(
    serve: Serve, http_client: UpstreamClient
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await response.write(b"data: " + orjson.dumps(chat_chunk(content="x")) + b"\n\n")
            await asyncio.sleep(0.02)

    server = await serve(endless)
    slow = PhaseTimeouts(first_byte=timedelta(seconds=30), idle=timedelta(seconds=30))
    await _cancel_when_received(http_client, server, route(server, stream=True, timeouts=slow))


async def test_send_needs_an_open_client() -> None:
    client = UpstreamClient()
    with pytest.raises(RuntimeError, match="not open"):
        await client.send(claimed(), Route(base_url="http://127.0.0.1:1"))


async def test_a_rate_limited_route_reads_that_the_upstream_has_no_requests_left(
    serve: Serve, http_client: UpstreamClient
) -> None:
    used_up = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0.5s"}
    server = await serve(json_answer(COMPLETION, **used_up))
    left = await serve(json_answer(COMPLETION, **{**used_up, "x-ratelimit-remaining-requests": "12"}))

    limited = await http_client.send(claimed(), route(server, requests_per_minute=600))
    unlimited = await http_client.send(claimed(), route(server))
    some_left = await http_client.send(claimed(), route(left, requests_per_minute=600))

    assert isinstance(limited, Success)
    assert limited.requests_used_up == timedelta(minutes=6, seconds=0.5)
    assert isinstance(unlimited, Success) and unlimited.requests_used_up is None  # not even read
    assert isinstance(some_left, Success) and some_left.requests_used_up is None


async def test_a_token_limited_route_reads_that_the_upstream_has_no_tokens_left(
    serve: Serve, http_client: UpstreamClient
) -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "20s",
    }
    server = await serve(json_answer(COMPLETION, **headers))
    requests_left = await serve(json_answer(COMPLETION, **{**headers, "x-ratelimit-remaining-requests": "5"}))

    tokens = await http_client.send(claimed(), route(server, tokens_per_minute=9000))
    both = await http_client.send(claimed(), route(requests_left, tokens_per_minute=9000, requests_per_minute=60))
    requests_only = await http_client.send(claimed(), route(server, requests_per_minute=600))

    assert isinstance(tokens, Success) and tokens.requests_used_up == timedelta(seconds=20)
    assert isinstance(both, Success) and both.requests_used_up == timedelta(seconds=20)
    # A route without a token limit does not read the token headers: the requests' reset only.
    assert isinstance(requests_only, Success) and requests_only.requests_used_up == timedelta(seconds=1)
