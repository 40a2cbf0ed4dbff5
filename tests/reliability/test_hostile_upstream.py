"""Scenario 6, hostile input, upstream answers (property, `UpstreamClient` against a raw socket server,
`hostile_upstream.RawUpstream`): malformed, truncated and garbled SSE, absurd `Retry-After` values, short bodies,
deep JSON: every call ends as an `Outcome`, never an exception (an exception would leave the request in
`processing`); the SSE parser and the reassemblers alone, many more streams: only their documented errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fusillade.domain import ids, models
from fusillade.upstream import classify, reassemble, sse
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.outcome import Outcome, Permanent, Retriable, Success
from fusillade.upstream.routes import PhaseTimeouts, Route
from tests.reliability.hostile_input import CHAT, deep, examples, json_values
from tests.reliability.hostile_upstream import RawUpstream, Script

pytestmark = pytest.mark.reliability

KEYS = ["choices", "index", "delta", "content", "tool_calls", "function", "arguments", "name", "logprobs"]
KEYS += ["error", "usage", "finish_reason", "role", "text", "type", "response", "object", "code", "status"]
stream_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=14,
)
event_data = st.one_of(
    stream_json.map(lambda value: orjson.dumps(value).decode()),
    st.text(max_size=20).map(lambda text: orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})),
    st.text(max_size=20).map(lambda text: orjson.dumps({"choices": [{"index": 0, "text": text}]})),
    st.integers(200, 1100).map(
        lambda n: '{"choices":[{"index":0,"delta":{"content":"x","extra":' + deep(n) + "}}]}"
    ),
    st.integers(200, 1100).map(lambda n: '{"type":"response.completed","response":{"x":' + deep(n) + "}}"),
    st.sampled_from(
        [
            sse.DONE,
            '{"error": {"message": "overloaded", "code": 529}}',
            '{"error": {"status": "503"}}',
            '{"type": "response.failed", "response": {"error": {"code": "server_error"}}}',
            '{"object": "error", "code": 1e999}',
            "1e999",
            "[",
        ]
    ),
    st.text(max_size=20),
).map(lambda data: data if isinstance(data, str) else data.decode())
event_names = st.sampled_from(
    ["", "", "error", "response.completed", "response.failed", "response.output_text.delta"]
)


well_formed_data = st.one_of(
    st.text(max_size=20).map(lambda text: {"choices": [{"index": 0, "delta": {"content": text}}]}),
    st.text(max_size=20).map(lambda text: {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}),
    st.just({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
).map(lambda value: orjson.dumps(value).decode())
deep_chunks = st.integers(254, 1000).map(
    lambda n: (
        '{"choices":[{"index":0,"delta":{"content":"x","extra":'
        + deep(n)
        + '},"text":"y","logprobs":{'
        + '"content":'
        + deep(n)
        + "}}]}"
    )
)
completed_responses = st.one_of(
    st.just('{"type":"response.completed","response":{"id":"r","output":[]}}'),
    st.integers(254, 1000).map(lambda n: '{"type":"response.completed","response":{"x":' + deep(n) + "}}"),
)


@st.composite
def sse_bodies(draw: st.DrawFn) -> tuple[bytes, ...]:
    """An SSE body cut into chunks: either well-formed events (whose data may still be nested deeper than a JSON
    writer goes), or any events with random fields, line ends, comments and garbage."""
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    body = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    if draw(st.booleans()):
        events = [(data, "") for data in draw(st.lists(well_formed_data | deep_chunks, max_size=4))]
        events += [(data, "") for data in draw(st.lists(completed_responses, max_size=1))]
        events.append((sse.DONE, ""))
        for data, _ in events:
            body += b"data: " + data.encode() + ending + ending
    else:
        for data, name in draw(st.lists(st.tuples(event_data, event_names), max_size=8)):
            if name:
                body += b"event: " + name.encode() + ending
            for field in draw(
                st.lists(st.sampled_from([b": ping", b"id: 7", b"retry: 99999999999999999999"]), max_size=2)
            ):
                body += field + ending
            body += b"".join(b"data: " + part.encode() + ending for part in data.split("\n"))
            body += ending if draw(st.integers(0, 9)) else b""  # sometimes an event is not closed
            if not draw(st.integers(0, 7)):
                body += draw(st.binary(max_size=12))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
    return tuple(body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True) if end > start)


PATHS = [CHAT, "/v1/completions", "/v1/responses"]


DEEP_STREAMS = {
    CHAT: b'data: {"choices":[{"index":0,"delta":{"content":' + deep(300).encode() + b"}}]}\n\ndata: [DONE]\n\n",
    "/v1/responses": b'data: {"type":"response.completed","response":{"x":' + deep(300).encode() + b"}}\n\n",
}
"""Regressions: a stream whose reassembled body orjson cannot write raised TypeError, not StreamError."""


@examples(500)
@given(chunks=sse_bodies(), path=st.sampled_from(PATHS), max_event_bytes=st.integers(16, 64 * 1024))
@example(chunks=(DEEP_STREAMS[CHAT],), path=CHAT, max_event_bytes=64 * 1024)
@example(chunks=(DEEP_STREAMS["/v1/responses"],), path="/v1/responses", max_event_bytes=64 * 1024)
def test_the_sse_parser_and_reassemblers_raise_only_their_documented_errors(
    chunks: tuple[bytes, ...], path: str, max_event_bytes: int
) -> None:
    make = reassemble.reassembler_for(path)
    assert make is not None
    parser = sse.SSEParser(max_event_bytes=max_event_bytes)
    reassembler = make()
    try:
        for chunk in chunks:
            for event in parser.feed(chunk):
                reassembler.add(event)
        for event in parser.finish():
            reassembler.add(event)
        body = reassembler.finish()
    except (sse.SSEError, reassemble.StreamError):
        return
    except reassemble.EmbeddedError as embedded:
        outcome = classify.classify_embedded_error(embedded)
        assert isinstance(outcome, Retriable | Permanent) and outcome.code == classify.UPSTREAM_ERROR
        assert outcome.body is None or orjson.loads(outcome.body) is not None or outcome.body == "null"
        return
    assert isinstance(orjson.loads(body), dict), "a reassembled body is a JSON object"


RETRY_AFTER_VALUES = [
    "1", "0", "-1", "", " ", "1.5", "nan", "inf", "1e999", "99999999999999999999999", "3600", "0x10", "١٢",
    "Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT", "tomorrow",
]  # fmt: skip
STATUSES = [200, 201, 204, 302, 400, 401, 404, 408, 409, 422, 429, 499, 500, 502, 503, 504, 529, 599]
plain_bodies = st.one_of(
    json_values.map(orjson.dumps),
    st.binary(max_size=60),
    st.integers(200, 1100).map(lambda n: ('{"id": "x", "choices": ' + deep(n) + "}").encode()),
    st.sampled_from([b"", b'{"error": {"message": "m", "code": 500}}', b'{"object": "error"}', b"\xff{}"]),
    st.just(b"x" * 70_000),  # over the client's size cap
)


@st.composite
def upstream_scripts(draw: st.DrawFn) -> tuple[Script, bool, bool]:
    """(script, stream it?, is the body sent whole?)."""
    if draw(st.booleans()):
        return Script(SSE_HEAD + b"; charset=utf-8", draw(sse_bodies())), True, True
    status = draw(st.sampled_from(STATUSES))
    body = draw(plain_bodies)
    head = b"HTTP/1.1 %d Whatever\r\nContent-Type: application/json" % status
    for name in draw(st.lists(st.sampled_from([b"Retry-After", b"retry-after-ms"]), max_size=2, unique=True)):
        head += b"\r\n" + name + b": " + draw(st.sampled_from(RETRY_AFTER_VALUES)).encode()
    framing = draw(st.sampled_from(["length", "close", "short"]))
    whole = framing != "short"
    if framing == "length":
        head += b"\r\nContent-Length: %d" % len(body)
    elif framing == "short":
        head += b"\r\nContent-Length: %d" % (len(body) + draw(st.integers(1, 1000)))
    cut = draw(st.integers(1, max(1, len(body))))
    return Script(head, tuple(part for part in (body[:cut], body[cut:]) if part)), False, whole


def claimed(path: str) -> models.ClaimedRequest:
    now = datetime.now(UTC)
    return models.ClaimedRequest(
        id=ids.new_request_id(),
        batch_id=ids.new_batch_id(),
        owner="mallory",
        custom_id="hostile",
        model="model-a",
        method="POST",
        url=path,
        body=orjson.dumps({"model": "model-a", "messages": [], "prompt": "p", "input": "i"}).decode(),
        attempt=0,
        deadline=now + timedelta(hours=1),
        daemon_id=ids.new_daemon_id(),
        claimed_at=now,
    )


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    async with RawUpstream() as server:
        yield server


@pytest.fixture
async def small_client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient(max_response_bytes=64 * 1024) as upstream_client:
        yield upstream_client


TIMEOUTS = PhaseTimeouts(
    connect=timedelta(seconds=10), first_byte=timedelta(seconds=20), idle=timedelta(seconds=20), total=None
)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"


@examples(80)
@given(scripted=upstream_scripts(), path=st.sampled_from([*PATHS, "/v1/embeddings"]))
@example(scripted=(Script(SSE_HEAD, (DEEP_STREAMS[CHAT],)), True, True), path=CHAT)
@example(scripted=(Script(SSE_HEAD, (DEEP_STREAMS["/v1/responses"],)), True, True), path="/v1/responses")
async def test_every_upstream_answer_ends_as_an_outcome(
    raw_upstream: RawUpstream, small_client: UpstreamClient, scripted: tuple[Script, bool, bool], path: str
) -> None:
    script, stream, whole = scripted
    raw_upstream.script = script
    sent = raw_upstream.requests
    route = Route(base_url=raw_upstream.url, stream=stream, timeouts=TIMEOUTS)

    outcome: Outcome = await small_client.send(claimed(path), route)

    assert raw_upstream.requests == sent + 1
    assert isinstance(outcome, Success | Retriable | Permanent)
    if isinstance(outcome, Success):
        assert 200 <= outcome.status_code <= 299
        orjson.loads(outcome.body)  # stored as JSON text
    else:
        assert outcome.code and outcome.message
        assert outcome.body is None or orjson.loads(outcome.body) is not None or outcome.body == "null"
    if isinstance(outcome, Retriable) and outcome.retry_after is not None:
        assert timedelta(0) <= outcome.retry_after
    status = int(script.head.split(b" ", 2)[1])
    if not stream and whole and status >= 300 and outcome.code != classify.RESPONSE_TOO_LARGE:
        assert outcome.code == f"http_{status}", (script.head, outcome)
        retriable = status in (408, 429) or 500 <= status <= 599
        assert isinstance(outcome, Retriable if retriable else Permanent), outcome
