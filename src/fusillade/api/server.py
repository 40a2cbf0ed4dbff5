"""The HTTP server under the API: uvicorn with its httptools protocol, plus limits on what a client can make the
process hold before a request reaches the application.

| limit (`HttpLimits`)                                     | default | over it                                 |
|----------------------------------------------------------|---------|-----------------------------------------|
| `max_header_bytes`: request line and headers together    | 64 KiB  | 431 `request_headers_too_large`, closed |
| `max_headers`: header fields of one request              | 100     | 431 `request_headers_too_large`, closed |
| `header_timeout`: from the connection (or the request's  | 10 s    | 408 `request_timeout`, closed           |
| first byte) to the end of its headers                    |         |                                         |
| `max_connections`: connections open at once              | 1,000   | 503 `too_many_connections` with         |
|                                                          |         | `Retry-After`, at once, closed          |

uvicorn offers none of these for httptools (what `uvicorn[standard]` picks): httptools keeps a header in memory
however long it is (50 MB of `Authorization` were read whole), a client may send its headers one byte at a time
for ever, and `limit_concurrency` answers 503 only once a request's headers have arrived. `BoundedHttpProtocol`
adds them to uvicorn's protocol through its own hooks (the parser callbacks, `connection_made`,
`data_received`), and `ServerConfig` is the `uvicorn.Config` that uses it.

A refused client gets its answer (JSON, the API's error envelope), then the connection is half-closed and what
it still sends is read and dropped for at most `LINGER_SECONDS` (closing with unread data would reset the
connection, and the client could lose the answer).
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import get_remote_addr
from uvicorn.server import ServerState

from fusillade.api.errors import INVALID_REQUEST, NO_RETRY, RETRY_AFTER_SECONDS, SERVER_ERROR

logger = logging.getLogger("fusillade.api")

LINGER_SECONDS: Final = 2.0
"""How long a refused connection is read (and dropped) after its answer, at most, before it is closed."""
_LINE_OVERHEAD: Final = 4
"""Bytes of a header line besides its name and value: `: ` and CRLF."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one client may make the HTTP server hold (see the module's table); `[server]` in the configuration."""

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    """Seconds."""
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    code: str
    message: str
    headers: Mapping[str, str]

    def response(self) -> bytes:
        kind = SERVER_ERROR if self.status >= 500 else INVALID_REQUEST
        body = orjson.dumps({"error": {"message": self.message, "type": kind, "param": None, "code": self.code}})
        lines = [
            f"HTTP/1.1 {self.status} {http.HTTPStatus(self.status).phrase}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: close",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _too_many_connections(limit: int) -> _Refusal:
    message = f"The server has {limit} connections open, its limit; retry later."
    return _Refusal(503, "too_many_connections", message, {"retry-after": str(RETRY_AFTER_SECONDS)})


def _headers_too_large(message: str) -> _Refusal:
    return _Refusal(431, "request_headers_too_large", message, NO_RETRY)


def _request_timeout(seconds: float) -> _Refusal:
    # No x-should-retry: false here, a slow client may well succeed on its next try.
    return _Refusal(408, "request_timeout", f"The request's headers did not arrive within {seconds:g} s.", {})


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request over a limit (see `BoundedHttpProtocol`)."""


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration for fusillade's servers: the bounded httptools protocol with `limits`, no
    WebSocket, no `server` header, uvicorn's logging left to fusillade's."""

    def __init__(
        self, app: Callable[..., Any], *, limits: HttpLimits, graceful_shutdown: int | None = None
    ) -> None:
        super().__init__(
            app,
            http=BoundedHttpProtocol,
            ws="none",
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=graceful_shutdown,
        )
        self.limits = limits


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `HttpLimits` (taken from a `ServerConfig`, else the defaults)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = config.limits if isinstance(config, ServerConfig) else HttpLimits()
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        """Between the first byte of a request and the end of its headers."""
        self._head_bytes = 0
        """Bytes received while in the head, counting whole reads after the one where the request began."""
        self._head_size = 0
        """Request line and headers as parsed so far (names, values and line overhead)."""
        self._header_count = 0
        self._refusal: _Refusal | None = None

    # -------------------------------------------------------------------------------- the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limit = self._limits.max_connections
        if len(self.connections) >= limit:
            self.transport = transport
            self.client = get_remote_addr(transport)
            self._refuse(_too_many_connections(limit))
            return
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # refused: read and dropped until the client closes or the linger ends
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._refusal is None and self._head_bytes > self._limits.max_header_bytes:
            # httptools holds a header's text until its end: stop before it grows further.
            self._refuse(self._headers_too_large())

    def send_400_response(self, msg: str) -> None:
        """What uvicorn calls when parsing fails, also when a callback below refused the request."""
        if self._refusal is not None:
            self._answer(self._refusal)
        else:
            super().send_400_response(msg)

    # ------------------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._head_size = self._header_count = 0
        if self._head_timer is None:  # the first request's timer runs from the connection
            self._start_head_timer()

    def on_url(self, url: bytes) -> None:
        self._grow_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._limits.max_headers:
            self._refusal = _headers_too_large(
                f"The request has more than {self._limits.max_headers} header fields, the server's limit."
            )
            raise _Refused
        self._grow_head(len(name) + len(value) + _LINE_OVERHEAD)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    # -------------------------------------------------------------------------------------- helpers

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._limits.max_header_bytes:
            self._refusal = self._headers_too_large()
            raise _Refused

    def _headers_too_large(self) -> _Refusal:
        return _headers_too_large(
            f"The request line and headers are larger than {self._limits.max_header_bytes} bytes, the server's "
            "limit."
        )

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self._refuse(_request_timeout(self._limits.header_timeout))

    def _refuse(self, refusal: _Refusal) -> None:
        self._refusal = refusal
        self._answer(refusal)

    def _answer(self, refusal: _Refusal) -> None:
        self._cancel_head_timer()
        self._in_head = False
        self.connections.discard(self)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info("Refused a request of %s: %s (HTTP %d).", client, refusal.code, refusal.status)
        if self.cycle is not None and not self.cycle.response_complete:
            # A response to an earlier request on this connection is under way: no answer can be slotted in.
            self.transport.close()
            return
        self.transport.write(refusal.response())
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
