"""The mock upstream's HTTP server: OpenAI-compatible endpoints with injectable faults, plus `GET /stats` and
`POST /reset` for use from another process.

Every wait (latency, stalls, the pause between events) ends early when the server closes, so closing never
hangs on a request stalled "forever". The server runs with handler cancellation on: when a client goes away,
its handler is cancelled at once, which keeps the in-flight counts honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from fusillade.mock_upstream.behaviour import (
    CUSTOM_ID_HEADER,
    FAULT_KINDS,
    Behaviour,
    ConnectionReset,
    EmbeddedError,
    HttpError,
    MalformedEvent,
    SlowDrip,
    StallBeforeFirstByte,
    StallMidStream,
    StreamFault,
    TruncatedStream,
    choose_fault,
    retry_after_headers,
)
from fusillade.mock_upstream.responses import (
    ENDPOINTS,
    Endpoint,
    embedded_error,
    embedded_error_event,
    error_envelope,
    json_body,
    stream_events,
)
from fusillade.mock_upstream.stats import Arrival, UpstreamStats

STREAM_HEADER = "X-Fusillade-Stream"
"""Like the onwards proxy of the Rust original, `X-Fusillade-Stream: true` asks for a stream with usage."""
MALFORMED_EVENT = b"data: {this is not JSON\n\n"
MAX_BODY_BYTES = 64 * 1024 * 1024
_STATUS_MESSAGES = {
    401: "Incorrect API key provided.",
    429: "Rate limit reached for requests. Please try again later.",
}


class MockUpstream:
    """A fake OpenAI-compatible upstream on a real socket (127.0.0.1, a free port by default).

    ```python
    async with MockUpstream(Behaviour(error_rates={500: 0.1})) as upstream:
        ...  # send requests to upstream.url + "/v1/chat/completions"
        upstream.behaviour = Behaviour()  # takes effect for the next request
        assert upstream.stats.requests_total == ...
    ```
    """

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        track_custom_ids: bool = True,
        header_history: int = 1000,
    ) -> None:
        """`track_custom_ids=False` keeps no per-custom-id arrivals (flat memory for benchmarks) unless the
        behaviour has per-attempt faults, which need them; `header_history` bounds `stats.recent_headers`."""
        self._behaviour = behaviour or Behaviour()
        self._random = random.Random(self._behaviour.seed)
        self.stats = UpstreamStats(header_history=header_history)
        self.track_custom_ids = track_custom_ids
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closing = asyncio.Event()
        self._answered = 0
        self._serving = 0
        """Requests inside their capacity slot (`Behaviour.capacity`)."""
        self._slots = asyncio.Semaphore(self._behaviour.capacity or 1)

    @property
    def behaviour(self) -> Behaviour:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        """Applies from the next request on; reseeds the random numbers from `behaviour.seed`."""
        if behaviour.capacity != self._behaviour.capacity:
            self._slots = asyncio.Semaphore(behaviour.capacity or 1)
        self._behaviour = behaviour
        self._random = random.Random(behaviour.seed)

    @property
    def url(self) -> str:
        """The base URL, `http://127.0.0.1:<port>` (no trailing slash, no `/v1`)."""
        if self._url is None:
            raise RuntimeError("The mock upstream is not started.")
        return self._url

    def reset(self) -> None:
        """Forget the stats and reseed the random numbers, as `POST /reset` does."""
        self.stats.reset()
        self._random = random.Random(self._behaviour.seed)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/{tail:.*}", self._handle)
        app.router.add_get("/stats", self._get_stats)
        app.router.add_post("/reset", self._post_reset)
        return app

    async def start(self) -> MockUpstream:
        if self._runner is not None:
            raise RuntimeError("The mock upstream is already started.")
        self._closing = asyncio.Event()
        runner = web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        return self

    async def close(self) -> None:
        """Stop listening, end every stalled request (their connections are reset) and wait for the rest."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()
        self._url = None

    async def __aenter__(self) -> MockUpstream:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------------- handlers

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.to_json()), content_type="application/json")

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrival = Arrival(time.monotonic(), time.time())
        behaviour = self._behaviour
        body = _json_object(await request.read())
        model = body.get("model") if body is not None else None
        if not isinstance(model, str):
            model = ""
        custom_id = request.headers.get(CUSTOM_ID_HEADER)
        attempt = self.stats.record_arrival(
            path=request.path,
            model=model,
            custom_id=custom_id,
            headers=request.headers,
            arrival=arrival,
            track_custom_id=self.track_custom_ids or behaviour.counts_attempts,
        )
        self.stats.enter(model)
        try:
            if behaviour.api_key is not None and request.headers.get("Authorization") != (
                f"Bearer {behaviour.api_key}"
            ):
                return await self._send_error(request, HttpError(401))
            endpoint = ENDPOINTS.get(request.path)
            if endpoint is None:
                return await self._send_error(request, HttpError(404, f"Invalid URL (POST {request.path})"))
            if body is None:
                return await self._send_error(request, HttpError(400, "The body must be a JSON object."))
            if not model:
                return await self._send_error(request, HttpError(400, "You must provide a model parameter."))
            if self._over_capacity(behaviour):
                self.stats.count_fault("over_capacity")
                return await self._send_error(
                    request, HttpError(429, "Over capacity: too many requests in flight.")
                )
            async with self._capacity_slot(behaviour):
                return await self._answer(request, behaviour, endpoint, body, model, custom_id, attempt)
        except asyncio.CancelledError:
            self.stats.client_disconnects += 1
            raise
        finally:
            self.stats.leave(model)

    def _over_capacity(self, behaviour: Behaviour) -> bool:
        """Whether a request is refused now: every slot taken, and the behaviour refuses above its capacity."""
        capacity = behaviour.capacity
        return capacity is not None and behaviour.over_capacity == "refuse" and self._serving >= capacity

    @contextlib.asynccontextmanager
    async def _capacity_slot(self, behaviour: Behaviour) -> AsyncIterator[None]:
        """One of the `capacity` slots for the answer (queued for, first come first served, when the behaviour
        queues); nothing to take without a capacity."""
        if behaviour.capacity is None:
            yield
            return
        async with self._slots if behaviour.over_capacity == "queue" else contextlib.nullcontext():
            self._serving += 1
            try:
                yield
            finally:
                self._serving -= 1

    async def _answer(
        self,
        request: web.Request,
        behaviour: Behaviour,
        endpoint: Endpoint,
        body: dict[str, Any],
        model: str,
        custom_id: str | None,
        attempt: int | None,
    ) -> web.StreamResponse:
        fault = choose_fault(behaviour, custom_id=custom_id, attempt=attempt, rng=self._random)
        if fault is not None:
            self.stats.count_fault(FAULT_KINDS[type(fault)])
        delay = behaviour.latency.sample(self._random)
        if delay > 0 and await self._pause(delay):
            return _drop(request, reset=True)
        if isinstance(fault, ConnectionReset):
            return _drop(request, reset=True)
        if isinstance(fault, HttpError):
            return await self._send_error(request, fault, retry_after_headers(behaviour, fault))
        if isinstance(fault, StallBeforeFirstByte) and await self._pause(fault.seconds):
            return _drop(request, reset=True)
        stream_fault = fault if isinstance(fault, StreamFault) else None
        created = int(time.time())
        if endpoint != "embeddings" and (stream_body := _stream_request(request, body)) is not None:
            events = stream_events(endpoint, stream_body, model, created)
            if isinstance(fault, SlowDrip):
                return await self._send_drip(request, b"".join(events), fault, stream=True)
            return await self._send_stream(request, events, stream_fault, behaviour.event_interval_s)
        payload = json_body(endpoint, body, model, created, dimensions=behaviour.embedding_dimensions)
        if isinstance(fault, SlowDrip):
            return await self._send_drip(request, payload, fault, stream=False)
        return await self._send_json(request, payload, stream_fault)

    # ----------------------------------------------------------------------------------------- sending

    async def _pause(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: until cancelled); True when the server is closing instead."""
        if seconds is None:
            await self._closing.wait()
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()
                return True
        return False

    def _headers(self, content_type: str) -> dict[str, str]:
        self._answered += 1
        return {"Content-Type": content_type, "x-request-id": f"req_mock_{self._answered}"}

    async def _send_error(
        self, request: web.Request, fault: HttpError, extra_headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        message = fault.message or _STATUS_MESSAGES.get(fault.status) or f"Mock upstream error {fault.status}."
        headers = self._headers("application/json")
        if extra_headers:
            headers.update(extra_headers)
        response = web.Response(status=fault.status, body=error_envelope(fault.status, message), headers=headers)
        return await self._send(request, response)

    async def _send(self, request: web.Request, response: web.Response) -> web.Response:
        """Send a whole answer inside the handler, so that it is in flight until its last byte is written."""
        try:
            await response.prepare(request)
            self.stats.count_response(response.status)
            await response.write_eof()
        except ConnectionError:
            self.stats.client_disconnects += 1
        return response

    async def _send_json(
        self, request: web.Request, payload: bytes, fault: StreamFault | None
    ) -> web.StreamResponse:
        headers = self._headers("application/json")
        if fault is None or isinstance(fault, MalformedEvent | EmbeddedError):
            if isinstance(fault, MalformedEvent):
                payload = b"this is not JSON: " + payload[: len(payload) // 2]
            elif isinstance(fault, EmbeddedError):
                payload = embedded_error(fault.status, fault.message)
            return await self._send(request, web.Response(body=payload, headers=headers))
        response = web.StreamResponse(headers=headers)
        response.content_length = len(payload)
        half = len(payload) // 2
        try:
            await response.prepare(request)
            self.stats.count_response(response.status)
            await response.write(payload[:half])
            if isinstance(fault, TruncatedStream) or await self._pause(fault.seconds):
                _drop(request, reset=not isinstance(fault, TruncatedStream))
                return response
            await response.write(payload[half:])
            await response.write_eof()
        except ConnectionError:
            self.stats.client_disconnects += 1
        return response

    async def _send_drip(
        self, request: web.Request, payload: bytes, fault: SlowDrip, *, stream: bool
    ) -> web.StreamResponse:
        """Send `payload` (a JSON body with its length, or SSE events) in `fault.chunk_bytes` pieces,
        `fault.interval_s` apart."""
        headers = self._headers("text/event-stream; charset=utf-8" if stream else "application/json")
        if stream:
            headers["Cache-Control"] = "no-cache"
        response = web.StreamResponse(headers=headers)
        if not stream:
            response.content_length = len(payload)
        try:
            await response.prepare(request)
            self.stats.count_response(response.status)
            for index, piece in enumerate(fault.pieces(payload)):
                if index and await self._pause(fault.interval_s):
                    _drop(request, reset=True)
                    return response
                await response.write(piece)
            await response.write_eof()
        except ConnectionError:
            self.stats.client_disconnects += 1
        return response

    async def _send_stream(
        self, request: web.Request, events: list[bytes], fault: StreamFault | None, interval: float
    ) -> web.StreamResponse:
        headers = self._headers("text/event-stream; charset=utf-8")
        headers["Cache-Control"] = "no-cache"
        response = web.StreamResponse(headers=headers)
        try:
            await response.prepare(request)
            self.stats.count_response(response.status)
            if fault is None and interval == 0:
                await response.write(b"".join(events))
            elif not await self._write_events(request, response, events, fault, interval):
                return response
            await response.write_eof()
        except ConnectionError:
            self.stats.client_disconnects += 1
        return response

    async def _write_events(
        self,
        request: web.Request,
        response: web.StreamResponse,
        events: list[bytes],
        fault: StreamFault | None,
        interval: float,
    ) -> bool:
        """Write the events one by one with the fault in their midst (never after the last, so that a
        truncated stream always lacks its end). False when the connection is gone."""
        position = -1 if fault is None else min(fault.after_events, len(events) - 1)
        for index, event in enumerate(events):
            if index == position:
                if isinstance(fault, TruncatedStream):
                    _drop(request, reset=False)
                    return False
                if isinstance(fault, EmbeddedError):
                    await response.write(embedded_error_event(fault.status, fault.message))
                    return True
                if isinstance(fault, MalformedEvent):
                    await response.write(MALFORMED_EVENT)
                if isinstance(fault, StallMidStream) and await self._pause(fault.seconds):
                    _drop(request, reset=True)
                    return False
            if interval and index and await self._pause(interval):
                _drop(request, reset=True)
                return False
            await response.write(event)
        return True


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _stream_request(request: web.Request, body: dict[str, Any]) -> dict[str, Any] | None:
    """The body to stream for, or None for a JSON answer."""
    if body.get("stream") is True:
        return body
    if request.headers.get(STREAM_HEADER, "").lower() == "true":
        return body | {"stream": True, "stream_options": {"include_usage": True}}
    return None


def _drop(request: web.Request, *, reset: bool) -> web.Response:
    """Close the connection, with a TCP reset or after flushing what was written. The response returned is
    never sent (aiohttp finds the connection gone and lets it be)."""
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return web.Response(status=500)
