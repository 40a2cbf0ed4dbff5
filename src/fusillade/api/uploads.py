"""`POST /v1/files` read as a stream: a multipart/form-data body whose `file` part is handed on chunk by chunk
(to the service, which spools it to disk), never gathered in memory.

A body whose `Content-Length` says that its file is over the byte limit is refused before any of it is read
(`check_declared_size`); a body without one is refused as soon as the file passes the limit.

The official SDK sends `purpose` first and `file` last; curl sends the parts in the order given. Both work: the
file's chunks flow while it arrives, the other parts are small text fields kept in memory (bounded), and the
stream of chunks raises `InvalidParameter` (so nothing is stored) if, once the whole body has been read,
`purpose` is not `batch`, a second file came, or the body was cut short.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from fusillade.service import DEFAULT_FILENAME, InvalidParameter, file_too_large

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_PART: Final = "file"
PURPOSE: Final = "batch"
MAX_FIELD_BYTES: Final = 64 * 1024
MAX_FIELDS: Final = 32
FORM_ALLOWANCE: Final = MAX_FIELDS * MAX_FIELD_BYTES + 64 * 1024
"""Bytes a multipart body may hold besides its file: the other fields at their largest, and the parts' headers."""


def check_declared_size(content_length: str | None, max_bytes: int) -> None:
    """Refuse (`InvalidParameter`, param `file`) a body whose `Content-Length` is larger than a file of
    `max_bytes` and the rest of a form can make it, before any of it is read."""
    if (
        content_length is not None
        and content_length.isdigit()
        and int(content_length) > max_bytes + FORM_ALLOWANCE
    ):
        raise file_too_large(max_bytes)


class MultipartUpload:
    """One upload request's body. Use in this order: `await open_file()` (the file's name), then iterate
    `file_chunks()`; after a failure, `await drain(limit)` reads the rest of the body so that the client gets
    the error response instead of a broken connection."""

    def __init__(self, content_type: str | None, body: AsyncIterator[bytes]) -> None:
        self._body = body
        try:
            self._parser = MultipartParser(_boundary(content_type), self._callbacks())
        except FormParserError as exc:
            raise _malformed(exc) from exc
        self._body_done = False
        self._form_done = False
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._file_data: deque[bytes] = deque()
        self._file_done = False
        # The part being parsed.
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._part_name = ""
        self._in_file = False
        self._field_data = bytearray()

    async def open_file(self) -> str:
        """Read up to the start of the file part; return its filename. Fails fast when the body has no file
        part or an early `purpose` field is wrong."""
        while self.filename is None:
            if not await self._pump():
                raise InvalidParameter(
                    FILE_PART,
                    "The request has no 'file' part: send the JSONL file as the multipart/form-data field 'file', "
                    "with purpose=batch.",
                )
        if "purpose" in self.fields:
            _check_purpose(self.fields)
        return self.filename

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The file part's bytes as they arrive; then the rest of the body is read and the form checked."""
        while True:
            while self._file_data:
                yield self._file_data.popleft()
            if self._file_done:
                break
            if not await self._pump():
                raise _cut_short()
        while await self._pump():
            pass
        if not self._form_done:
            raise _cut_short()
        _check_purpose(self.fields)

    async def drain(self, limit: int) -> None:
        """Read and drop the rest of the body, at most `limit` bytes (past that the connection is dropped)."""
        read = 0
        try:
            while not self._body_done and read <= limit:
                chunk = await anext(self._body, None)
                if chunk is None:
                    self._body_done = True
                else:
                    read += len(chunk)
        except ClientDisconnect:
            self._body_done = True

    async def _pump(self) -> bool:
        """Feed the next chunk of the body to the parser; False when the body has ended."""
        if self._body_done:
            return False
        chunk = await anext(self._body, None)
        if chunk is None:
            self._body_done = True
            self._parser.finalize()
            return False
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise _malformed(exc) from exc
        return True

    # ------------------------------------------------------------------------------------ parser events

    def _callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._disposition = b""
        self._in_file = False
        self._field_data = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name = bytearray()
        self._header_value = bytearray()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidParameter(FILE_PART, "A multipart part has no name in its Content-Disposition header.")
        self._part_name = options[b"name"].decode("utf-8", "replace")
        if self._part_name == FILE_PART:
            if self.filename is not None:
                raise InvalidParameter(FILE_PART, "The request has more than one 'file' part; upload one file.")
            self._in_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or DEFAULT_FILENAME
        elif len(self.fields) >= MAX_FIELDS:
            raise InvalidParameter(self._part_name, f"The form has more than {MAX_FIELDS} fields.")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._file_data.append(data[start:end])
            return
        self._field_data += data[start:end]
        if len(self._field_data) > MAX_FIELD_BYTES:
            raise InvalidParameter(
                self._part_name, f"The form field {self._part_name!r} is longer than {MAX_FIELD_BYTES} bytes."
            )

    def _on_part_end(self) -> None:
        if self._in_file:
            self._file_done = True
        else:
            self.fields[self._part_name] = self._field_data.decode("utf-8", "replace")

    def _on_end(self) -> None:
        self._form_done = True


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        shown = content_type or "none"
        raise InvalidParameter(
            FILE_PART,
            f"Upload the file as multipart/form-data with the fields 'purpose' (batch) and 'file' "
            f"(the Content-Type was {shown[:100]!r}).",
        )
    return options[b"boundary"]


def _check_purpose(fields: dict[str, str]) -> None:
    purpose = fields.get("purpose")
    if purpose is None:
        raise InvalidParameter("purpose", "purpose is missing; it must be 'batch'.")
    if purpose != PURPOSE:
        raise InvalidParameter(
            "purpose",
            f"purpose {purpose[:40]!r} is not supported: fusillade stores batch input files; use purpose=batch.",
        )


def _cut_short() -> InvalidParameter:
    return InvalidParameter(FILE_PART, "The upload ended before the multipart/form-data body was complete.")


def _malformed(exc: FormParserError) -> InvalidParameter:
    return InvalidParameter(FILE_PART, f"The multipart/form-data body is malformed ({exc}).")
