"""A raw HTTP/1.1 upstream for the hostile-input scenario: it answers every request with the bytes the test
scripted (status line and headers, then body chunks, each flushed on its own), then closes the connection.

The fake upstream (`fusillade.mock_upstream`) speaks well-formed HTTP with chosen faults; this one sends
whatever it is given: malformed or truncated SSE, absurd `Retry-After` values, bodies shorter than their
`Content-Length`, JSON nested deeper than a JSON writer accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self


@dataclass(frozen=True)
class Script:
    """One answer: `head` is the status line and header lines (CRLF-separated, without the blank line that
    ends them; `Connection: close` is added), `chunks` the body as sent, one write each."""

    head: bytes
    chunks: tuple[bytes, ...] = ()


@dataclass
class RawUpstream:
    script: Script = field(default_factory=lambda: Script(b"HTTP/1.1 200 OK\r\nContent-Length: 2", (b"{}",)))
    """The answer to the next requests; a test changes it between calls."""
    requests: int = 0
    """Requests read so far."""
    url: str = ""
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.requests += 1
            script = self.script
            writer.write(script.head + b"\r\nConnection: close\r\n\r\n")
            await writer.drain()
            for chunk in script.chunks:
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client gave up (a timeout, a size cap): nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
