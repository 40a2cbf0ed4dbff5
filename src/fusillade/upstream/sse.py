"""An incremental reader of Server-Sent Events (the WHATWG `text/event-stream` format).

Feed it the bytes of a response as they arrive, in chunks of any size, and it returns the events completed so
far. The rules kept from the WHATWG parsing algorithm: lines end in `\\n`, `\\r\\n` or `\\r` (a `\\r\\n` split
across two chunks is one line end); one leading byte order mark is dropped; a line starting with `:` is a
comment; `field: value` loses a single space after the colon; `data` lines are joined with `\\n`; `event`
sets the event type and `id` the last event id (kept for later events, ignored if it contains NUL); `retry`
takes ASCII digits only (18 at most); other fields are ignored; a blank line dispatches the event, unless it
has no data.

One deliberate difference at the end of the stream: WHATWG drops an event that was not closed by a blank line.
`finish` dispatches it when all its lines were complete (a stream ending in `data: [DONE]\\n` still counts as
done); an unterminated last line is dropped, since it may have been cut anywhere.

Memory is bounded: a line, or the data of one event, longer than `max_event_bytes` raises `SSEError` instead of
growing the buffer. After an error the parser must not be fed again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DONE = "[DONE]"
"""The data of the last event of an OpenAI-style stream (chat completions and completions)."""

DEFAULT_MAX_EVENT_BYTES = 64 * 1024 * 1024

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_MAX_RETRY_DIGITS = 18
"""A longer `retry` value is ignored (Python refuses to convert very long digit strings)."""


class SSEError(Exception):
    """The byte stream cannot be read as SSE within the limits (a line or an event is too long)."""


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = ""
    """The `event` field; empty when the event had none (WHATWG then calls it a `message` event)."""
    id: str = ""
    """The last event id of the stream at the time of this event."""
    retry: int | None = None
    """The reconnection time in milliseconds given by the last valid `retry` field, if any."""


class SSEParser:
    __slots__ = (
        "_data",
        "_data_size",
        "_event_type",
        "_last_id",
        "_max",
        "_pending",
        "_pending_size",
        "_retry",
        "_skip_newline",
        "_started",
    )

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be positive, not {max_event_bytes}.")
        self._max = max_event_bytes
        self._pending: list[bytes] = []
        """The start of a line not yet ended (never holds a line end, so nothing is scanned twice)."""
        self._pending_size = 0
        self._skip_newline = False
        """The last chunk ended in `\\r`: a `\\n` starting the next chunk belongs to that line end."""
        self._started = False
        """The possible byte order mark at the very start was dealt with."""
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """Take the next bytes of the stream; return the events they complete, in order."""
        if self._skip_newline and chunk:
            self._skip_newline = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if not self._started:
            chunk = self._strip_bom(chunk)
        if not chunk:
            return []
        events: list[Event] = []
        pending = self._pending
        position = 0
        match = _LINE_END.search(chunk)
        while match is not None:
            start, stop = match.span()
            if pending:
                pending.append(chunk[position:start])
                line = b"".join(pending)
                pending.clear()
                self._pending_size = 0
            else:
                line = chunk[position:start]
            if len(line) > self._max:
                raise SSEError(f"An SSE line is longer than {self._max} bytes.")
            self._line(line, events)
            position = stop
            match = _LINE_END.search(chunk, position)
        if position < len(chunk):
            rest = chunk[position:] if position else chunk
            pending.append(rest)
            self._pending_size += len(rest)
            if self._pending_size > self._max:
                raise SSEError(f"An SSE line is longer than {self._max} bytes.")
        elif chunk[-1] == 0x0D:
            self._skip_newline = True
        return events

    def finish(self) -> list[Event]:
        """The stream ended: return the last event if all its lines were complete (see the module docstring)."""
        self._pending.clear()
        self._pending_size = 0
        events: list[Event] = []
        self._line(b"", events)
        return events

    def _strip_bom(self, chunk: bytes) -> bytes:
        if self._pending:
            chunk = b"".join([*self._pending, chunk])
            self._pending.clear()
            self._pending_size = 0
        if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
            if chunk:
                self._pending.append(chunk)
                self._pending_size = len(chunk)
            return b""
        self._started = True
        return chunk[len(_BOM) :] if chunk.startswith(_BOM) else chunk

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            if self._data:
                events.append(Event("\n".join(self._data), self._event_type, self._last_id, self._retry))
                self._data = []
                self._data_size = 0
            self._event_type = ""
            return
        if line.startswith(b"data:"):
            value = line[6:] if line.startswith(b" ", 5) else line[5:]
            self._data_size += len(value) + 1
            if self._data_size > self._max:
                raise SSEError(f"An SSE event carries more than {self._max} bytes of data.")
            self._data.append(value.decode("utf-8", "replace"))
            return
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit() and len(value) <= _MAX_RETRY_DIGITS:
            self._retry = int(value)
        elif name == b"data":  # a bare `data` line: an empty data line
            self._data_size += 1
            self._data.append("")
