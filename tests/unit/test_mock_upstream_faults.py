"""The mock upstream's slow-drip fault: an answer sent in small pieces with pauses between them. The pure parts
(validation, the pieces, fault selection), then over a real socket, timed by the client reading it."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusillade.mock_upstream import Behaviour, MockUpstream, SlowDrip, choose_fault, reply_text
from fusillade.mock_upstream.behaviour import FAULT_KINDS

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    "make",
    [
        lambda: SlowDrip(chunk_bytes=0),
        lambda: SlowDrip(interval_s=-0.1),
        lambda: SlowDrip(interval_s=float("inf")),
        lambda: SlowDrip(interval_s=float("nan")),
    ],
)
def test_slow_drip_rejects_nonsense(make: Any) -> None:
    with pytest.raises(ValueError, match="SlowDrip"):
        make()


@given(payload=st.binary(max_size=300), size=st.integers(min_value=1, max_value=40))
def test_the_pieces_are_the_payload_in_order_and_none_is_too_big(payload: bytes, size: int) -> None:
    pieces = SlowDrip(chunk_bytes=size).pieces(payload)
    assert b"".join(pieces) == payload
    assert all(0 < len(piece) <= size for piece in pieces) or pieces == [b""]
    assert len(pieces) == max(1, -(-len(payload) // size))


def test_slow_drip_is_scripted_per_attempt_and_counted_under_its_own_name() -> None:
    drip = SlowDrip(chunk_bytes=4, interval_s=0.01)
    behaviour = Behaviour(faults_by_custom_id={"c1": [drip, None]})
    rng = random.Random(0)
    assert choose_fault(behaviour, custom_id="c1", attempt=0, rng=rng) == drip
    assert choose_fault(behaviour, custom_id="c1", attempt=1, rng=rng) is None
    assert FAULT_KINDS[SlowDrip] == "slow_drip"


# ---------------------------------------------------------------------------------- over a real socket


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], **extra}


async def read_timed(response: aiohttp.ClientResponse) -> tuple[bytes, list[float]]:
    """The whole body, and the time each chunk arrived (monotonic)."""
    chunks, times = [], []
    while chunk := await response.content.readany():
        chunks.append(chunk)
        times.append(time.monotonic())
    return b"".join(chunks), times


async def test_a_slow_drip_json_body_arrives_whole_in_spaced_pieces(session: aiohttp.ClientSession) -> None:
    drip = SlowDrip(chunk_bytes=64, interval_s=0.03)
    behaviour = Behaviour(faults_by_custom_id={"c1": [drip]})
    async with MockUpstream(behaviour) as upstream:
        started = time.monotonic()
        headers = {"X-Fusillade-Custom-Id": "c1"}
        async with session.post(upstream.url + CHAT, json=chat("drip"), headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/json")
            body, times = await read_timed(response)
        assert upstream.stats.faults_by_kind == {"slow_drip": 1}
        assert upstream.stats.responses_by_status == {200: 1}
    assert int(response.headers["Content-Length"]) == len(body)
    document = orjson.loads(body)
    assert document["choices"][0]["message"]["content"] == reply_text("drip")
    pieces = len(drip.pieces(body))
    assert pieces >= 4
    # The pauses are the server's: the client cannot have the last piece before they all passed.
    assert times[-1] - started >= (pieces - 1) * drip.interval_s
    assert len(times) >= 2, "the body came in one read: it was not dripped"


async def test_a_slow_drip_stream_sends_every_event(session: aiohttp.ClientSession) -> None:
    drip = SlowDrip(chunk_bytes=100, interval_s=0.01)
    behaviour = Behaviour(faults_by_custom_id={"c1": [drip]})
    async with MockUpstream(behaviour) as upstream:
        body = chat("drip a stream", stream=True, stream_options={"include_usage": True})
        headers = {"X-Fusillade-Custom-Id": "c1"}
        async with session.post(upstream.url + CHAT, json=body, headers=headers) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw, times = await read_timed(response)
    events = [block.removeprefix(b"data: ") for block in raw.split(b"\n\n") if block]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    text = "".join(choice["delta"].get("content", "") for chunk in chunks for choice in chunk["choices"])
    assert text == reply_text("drip a stream")
    assert chunks[-1]["usage"] is not None
    assert len(times) >= 3


async def test_a_client_that_gives_up_on_a_drip_is_counted_and_the_next_attempt_is_normal(
    session: aiohttp.ClientSession,
) -> None:
    behaviour = Behaviour(faults_by_custom_id={"c1": [SlowDrip(chunk_bytes=8, interval_s=30.0), None]})
    async with MockUpstream(behaviour) as upstream:
        headers = {"X-Fusillade-Custom-Id": "c1"}
        async with session.post(upstream.url + CHAT, json=chat("x"), headers=headers) as response:
            first = await response.content.readany()
            assert 0 < len(first) <= 8
        # Leaving the block closed the connection mid-body; the server's handler is cancelled.
        async with session.post(upstream.url + CHAT, json=chat("x"), headers=headers) as response:
            document = await response.json()
        assert document["choices"][0]["message"]["content"] == reply_text("x")
        assert len(upstream.stats.attempts_by_custom_id["c1"]) == 2


async def test_closing_the_server_ends_a_drip_at_once(session: aiohttp.ClientSession) -> None:
    upstream = await MockUpstream(Behaviour(faults_by_custom_id={"c1": [SlowDrip(interval_s=60.0)]})).start()
    try:
        response = await session.post(upstream.url + CHAT, json=chat("x"), headers={"X-Fusillade-Custom-Id": "c1"})
        await response.content.readany()
    finally:
        started = time.monotonic()
        await upstream.close()
    assert time.monotonic() - started < 10, "close waited for the drip instead of ending it"
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    response.release()
