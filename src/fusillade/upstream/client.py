"""The HTTP client that sends claimed requests to their upstream and says what came of it.

One aiohttp `ClientSession` (one connection pool, keep-alive) serves every call; open it with
`async with UpstreamClient() as client`. `send` never raises for upstream trouble: every failure is an
`Outcome` (see `classify`). It does let `asyncio.CancelledError` through: the daemon cancels the task to abort a
call, and the connection is then closed, not returned to the pool.

What is sent: `request.method` to `route.base_url` + `request.url` (the host only ever comes from the route),
the body as stored, and these headers: `Authorization: Bearer <key>` when the route has a key,
`Content-Type: application/json`, `X-Fusillade-Request-Id`, `X-Fusillade-Batch-Id`, `X-Fusillade-Custom-Id`
when the custom id is safe in a header (printable ASCII without surrounding spaces, at most 256 characters),
then the caller's extra headers (batch metadata, `traceparent`), which cannot replace those. Redirects are not
followed.

The body is sent as stored: the bytes the user wrote in the input line. Streaming: when the route streams and
the path is chat completions, completions or responses, the body gets `"stream": true` (plus
`"stream_options": {"include_usage": true}` except for responses), spliced in without re-serialising the user's
fields (`stream_request`). Any 2xx answer with
`Content-Type: text/event-stream` on those paths is read as SSE and reassembled (`reassemble`), so the stored
body always has the non-streaming shape.

Timers (`route.timeouts`): `connect` for the TCP/TLS connection; `first_byte` from the start of the call to the
response headers, and for a stream to its first event; `idle` for the longest gap between two body chunks (two
events for a stream; comments such as keep-alive pings do not count); `total` for the whole call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Self

import aiohttp
import yarl

from fusillade.clock import SystemClock, WallClock
from fusillade.domain import ids, models, rate_limit
from fusillade.domain.usage import usage_of
from fusillade.upstream import classify, reassemble, sse, stream_request
from fusillade.upstream.outcome import Outcome, Permanent, Retriable, Success
from fusillade.upstream.routes import PhaseTimeouts, Route

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_CUSTOM_ID_HEADER = 256
"""A longer custom id is not sent as a header."""

_log = logging.getLogger(__name__)

_OWN_HEADERS = frozenset(
    {"authorization", "content-type", "x-fusillade-request-id", "x-fusillade-batch-id", "x-fusillade-custom-id"}
)
_EVENT_STREAM = "text/event-stream"


class UpstreamClient:
    """Sends claimed requests to their routes' upstreams over one pool of connections (streaming routes read
    as SSE and reassembled) and says what came of each. Use it as an async context manager."""

    def __init__(
        self,
        *,
        clock: WallClock | None = None,
        connection_limit: int = 0,
        keepalive_timeout: float = 30.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        """`connection_limit`: connections open at once across all upstreams, 0 for no limit (the daemon
        already bounds the calls in flight). `keepalive_timeout`: seconds an idle pooled connection is kept.
        `max_response_bytes`: a larger response body (decompressed) is a Permanent `response_too_large`."""
        if connection_limit < 0:
            raise ValueError(f"connection_limit must not be negative, not {connection_limit}.")
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be positive, not {max_response_bytes}.")
        self._clock = clock or SystemClock()
        self._connection_limit = connection_limit
        self._keepalive_timeout = keepalive_timeout
        self._max_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        if self._session is not None:
            raise RuntimeError("This UpstreamClient is already open.")
        connector = aiohttp.TCPConnector(
            limit=self._connection_limit, limit_per_host=0, keepalive_timeout=self._keepalive_timeout
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every pooled connection (calls still running end with a connection or stream error)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(
        self,
        request: models.ClaimedRequest,
        route: Route,
        *,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> Outcome:
        """Send one request to its route's upstream; what came of it, never an exception for upstream trouble.
        `headers` are added to the request (they cannot replace the headers this client sets itself).
        `deadline` (event loop time): the caller's own limit, e.g. the batch's expiry; a call still running
        then is aborted with `TimeoutError` (one timer serves it and the phase timeouts), and a call whose
        deadline has already passed is not sent at all (`TimeoutError` too)."""
        session = self._session
        if session is None:
            raise RuntimeError("UpstreamClient is not open: use `async with UpstreamClient(...) as client`.")
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline <= loop.time():
            # Checked here, not left to the timer: on a pooled connection aiohttp writes the request before the
            # first suspension, so a timer already due would still let it reach the upstream.
            raise TimeoutError("the caller's deadline passed before the call started")
        prepared = _prepare(request, route)
        if not isinstance(prepared, tuple):
            return self._logged(request, prepared)
        url, body, new_reassembler = prepared
        # The call itself is in this coroutine, not one more: every suspension of a call (and a call has a few)
        # resumes through each coroutine between the task and aiohttp, so each level costs on every call.
        timers = _Timers(loop, route.timeouts, deadline)
        response: aiohttp.ClientResponse | None = None
        reading_stream = clean = timed_out = False
        try:
            try:
                try:
                    response = await session.request(
                        request.method,
                        url,
                        data=body,
                        headers=_headers(request, route, headers),
                        allow_redirects=False,
                        timeout=_aiohttp_timeout(route.timeouts),
                    )
                except ValueError as exc:  # a header value aiohttp refuses (e.g. a newline), or a bad URL
                    return self._logged(request, classify.invalid_request(str(exc)))
                reassembler = _stream_reassembler(new_reassembler, response)
                if reassembler is not None:
                    reading_stream = True
                    timers.waiting_for = "first SSE event"
                    outcome = await self._read_stream(response, reassembler, timers, route)
                else:
                    content = response.content
                    if content.is_eof():  # a small body often came with the headers: no waiting
                        data: bytes | None = _capped(content.read_nowait(), self._max_bytes)
                    else:
                        timers.enter_idle("next body chunk")
                        data = await self._read_body(response, timers)
                    if data is None:
                        return self._logged(request, classify.response_too_large(self._max_bytes))
                    outcome = classify.classify_response(
                        response.status,
                        response.headers,
                        data,
                        clock=self._clock,
                        retry_404=route.retry_404,
                        rate_limited=route.requests_per_minute is not None,
                        token_limited=route.tokens_per_minute is not None,
                    )
                clean = True
            finally:
                timed_out = timers.stop()
        except (asyncio.CancelledError, TimeoutError, aiohttp.ClientError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not timed_out:
                raise  # the caller aborts the call
            outcome = _failure(exc, timers, route, reading_stream=reading_stream)
        finally:
            if response is not None:
                if clean:
                    response.release()
                else:
                    response.close()
        return self._logged(request, outcome)

    async def _read_body(self, response: aiohttp.ClientResponse, timers: _Timers) -> bytes | None:
        """The rest of the body (not all of it came with the headers), or None when it is larger than the cap."""
        limit = self._max_bytes
        length = response.content_length
        if length is not None and length > limit:
            return None
        content = response.content
        chunks: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if content.at_eof():
                break
            timers.enter_idle("next body chunk")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        reassembler: reassemble.Reassembler,
        timers: _Timers,
        route: Route,
    ) -> Outcome:
        """Read SSE until the end marker (or the end of the body) and reassemble it."""
        limit = self._max_bytes
        parser = sse.SSEParser(max_event_bytes=limit)
        content = response.content
        size = 0
        try:
            while not reassembler.complete:
                chunk = await content.readany()
                if not chunk:
                    for event in parser.finish():
                        reassembler.add(event)
                    break
                size += len(chunk)
                if size > limit:
                    return classify.response_too_large(limit)
                events = parser.feed(chunk)
                if events:
                    for event in events:
                        reassembler.add(event)
                    timers.enter_idle("next SSE event")
            body = reassembler.finish()
        except (sse.SSEError, reassemble.StreamError) as exc:
            return classify.stream_error(exc)
        except reassemble.EmbeddedError as exc:
            return classify.classify_embedded_error(exc, retry_404=route.retry_404)
        text = body.decode()
        used_up = None
        if route.requests_per_minute is not None or route.tokens_per_minute is not None:
            used_up = rate_limit.limits_used_up(
                response.headers,
                requests=route.requests_per_minute is not None,
                tokens=route.tokens_per_minute is not None,
            )
        return Success(status_code=response.status, body=text, usage=usage_of(text), requests_used_up=used_up)

    def _logged(self, request: models.ClaimedRequest, outcome: Outcome) -> Outcome:
        if _log.isEnabledFor(logging.DEBUG):
            result = f"HTTP {outcome.status_code}" if isinstance(outcome, Success) else outcome.code
            _log.debug("upstream call for %s: %s", ids.request_wire(request.id), result)
        return outcome


class _Timers:
    """The deadlines of one call, on the event loop's clock, and the one timer that holds the call to them: when
    it runs out it cancels the call's task, as `asyncio.timeout` would, at a fraction of its cost per call (one
    loop timer, no context manager). It is moved on as the phases go (first byte, then idle gaps), never past
    the total deadline; `stop` says whether the cancellation the call met was the timer's own."""

    __slots__ = (
        "_cancelling",
        "_deadline",
        "_fired",
        "_handle",
        "_idle",
        "_loop",
        "_task",
        "_timeouts",
        "_total_at",
        "_when",
        "phase",
        "waiting_for",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, timeouts: PhaseTimeouts, deadline: float | None) -> None:
        """Start timing the call of the current task."""
        start = loop.time()
        first_byte, self._idle, total = _phase_seconds(timeouts)
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("An upstream call must run in a task.")
        self._loop = loop
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False
        self._timeouts = timeouts
        self._deadline = deadline
        # The caller's deadline caps the call like its total timeout (and wins a tie: see `timed_out`).
        self._total_at = _earliest(deadline, None if total is None else start + total)
        self.phase = "first_byte"
        self.waiting_for = "response headers"
        self._handle: asyncio.TimerHandle | None = None
        self._when: float | None = None
        self._arm(_earliest(None if first_byte is None else start + first_byte, self._total_at))

    def enter_idle(self, waiting_for: str) -> None:
        self.phase = "idle"
        self.waiting_for = waiting_for
        idle_at = None if self._idle is None else self._loop.time() + self._idle
        when = _earliest(idle_at, self._total_at)
        if when != self._when:
            self._arm(when)

    def stop(self) -> bool:
        """Stop timing; True when the timer ran out and its cancellation is the only one the task got (the
        call timed out, nothing else is cancelling the task)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return self._fired and self._task.uncancel() <= self._cancelling

    def timed_out(self) -> Retriable:
        """The outcome of a phase timeout; `TimeoutError` if it was the caller's deadline."""
        if self._deadline is not None and self._when == self._deadline:
            raise TimeoutError(f"the caller's deadline passed ({self.waiting_for})")
        timeouts = self._timeouts
        if self._total_at is not None and self._when == self._total_at and timeouts.total is not None:
            return classify.timeout("total", f"the call took more than {_seconds(timeouts.total)}")
        limit = timeouts.first_byte if self.phase == "first_byte" else timeouts.idle
        within = f" within {_seconds(limit)}" if limit is not None else ""
        return classify.timeout(self.phase, f"no {self.waiting_for}{within}")

    def _arm(self, when: float | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._when = when
        self._handle = None if when is None else self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._fired = True
        self._task.cancel()


Reassemblers = Callable[[], reassemble.Reassembler] | None


def _prepare(request: models.ClaimedRequest, route: Route) -> tuple[yarl.URL, bytes, Reassemblers] | Permanent:
    """The URL and body to send, and how to reassemble a stream of the path (None: not a streaming path); or
    why the request cannot be sent."""
    try:
        url = _target(route.base_url, request.url)
    except ValueError as exc:
        return classify.invalid_request(f"no valid URL from the route and path ({exc})")
    new_reassembler = _reassembler_factory(request.url)
    if route.stream and new_reassembler is not None:
        body = stream_request.streaming_body(
            request.body.encode(), usage=new_reassembler is not reassemble.ResponsesReassembler
        )
        if body is None:
            return classify.invalid_request("a streamed request needs a JSON object body")
        return url, body, new_reassembler
    return url, request.body.encode(), new_reassembler


def _stream_reassembler(
    new_reassembler: Reassemblers, response: aiohttp.ClientResponse
) -> reassemble.Reassembler | None:
    """A reassembler when the response is a 2xx event stream on a streaming path; None: read it whole."""
    if new_reassembler is None or not 200 <= response.status <= 299:
        return None
    return new_reassembler() if _is_event_stream(response.headers.get("Content-Type")) else None


def _capped(data: bytes, limit: int) -> bytes | None:
    return None if len(data) > limit else data


def _failure(
    exc: asyncio.CancelledError | TimeoutError | aiohttp.ClientError,
    timers: _Timers,
    route: Route,
    *,
    reading_stream: bool,
) -> Retriable:
    """What a call that failed came to: our timer ran out (the cancellation was its own), aiohttp's ran out (it
    times only the connect phase, see `_aiohttp_timeout`), or the connection or the stream broke."""
    if isinstance(exc, asyncio.CancelledError):
        return timers.timed_out()
    if isinstance(exc, TimeoutError):
        limit = route.timeouts.connect
        return classify.timeout("connect", f"no connection within {_seconds(limit)}" if limit else str(exc))
    return classify.stream_error(exc) if reading_stream else classify.connection_error(exc)


def _is_event_stream(content_type: str | None) -> bool:
    """`text/event-stream`, whatever its parameters (a header lookup, cheaper than parsing the media type)."""
    if content_type is None:
        return False
    media_type, _, _ = content_type.partition(";")
    return media_type.strip().lower() == _EVENT_STREAM


def _earliest(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def _seconds(duration: timedelta) -> str:
    return f"{duration.total_seconds():g} s"


@functools.lru_cache(maxsize=1024)
def _target(base_url: str, path: str) -> yarl.URL:
    """The upstream URL: the route's base URL with the request path appended (`/v1` not doubled)."""
    base = base_url.rstrip("/")
    if not path.startswith("/"):
        path = "/" + path
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    url = yarl.URL(base + path)
    if not url.absolute or url.scheme not in ("http", "https"):
        raise ValueError(f"{base_url!r} is not an http(s) base URL")
    return url


_reassembler_factory = functools.lru_cache(maxsize=256)(reassemble.reassembler_for)


@functools.lru_cache(maxsize=64)
def _phase_seconds(timeouts: PhaseTimeouts) -> tuple[float | None, float | None, float | None]:
    """The first byte, idle and total limits in seconds (None: no limit), worked out once per set of limits."""
    return _seconds_or_none(timeouts.first_byte), _seconds_or_none(timeouts.idle), _seconds_or_none(timeouts.total)


def _seconds_or_none(limit: timedelta | None) -> float | None:
    return None if limit is None else limit.total_seconds()


@functools.lru_cache(maxsize=64)
def _aiohttp_timeout(timeouts: PhaseTimeouts) -> aiohttp.ClientTimeout:
    """aiohttp times the connection itself (it knows when connecting ends); the other phases are ours."""
    connect = None if timeouts.connect is None else timeouts.connect.total_seconds()
    return aiohttp.ClientTimeout(total=None, sock_connect=connect)


def _headers(request: models.ClaimedRequest, route: Route, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {name: value for name, value in extra.items() if name.lower() not in _OWN_HEADERS} if extra else {}
    if route.api_key:
        headers["Authorization"] = "Bearer " + route.api_key
    headers["Content-Type"] = "application/json"
    headers["X-Fusillade-Request-Id"] = ids.request_wire(request.id)
    headers["X-Fusillade-Batch-Id"] = ids.batch_wire(request.batch_id)
    custom_id = request.custom_id
    if _header_safe(custom_id):
        headers["X-Fusillade-Custom-Id"] = custom_id
    return headers


def _header_safe(value: str) -> bool:
    return (
        0 < len(value) <= MAX_CUSTOM_ID_HEADER
        and value.isascii()
        and value.isprintable()
        and value[0] != " "
        and value[-1] != " "
    )
