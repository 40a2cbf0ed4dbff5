"""The lines of an input file read as a stream of chunks (`split_lines`), holding no more than the unfinished
last line, and that only up to the line limit (see `domain.jsonl`)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator

from fusillade import errors

_NOT_BLANK = re.compile(rb"[^ \t\r\n]")


class TooLong:
    """A line longer than `Limits.max_line_bytes`, in the stream of lines: its bytes were dropped."""


TOO_LONG = TooLong()


async def split_lines(
    chunks: AsyncIterable[bytes], max_bytes: int, max_line_bytes: int
) -> AsyncIterator[list[bytes | int | TooLong]]:
    """Yield the complete lines of each chunk (without their `\\n`), and at the end the last line if the file
    does not end with a newline. Only the unfinished last line is kept between chunks, and only while it is at
    most `max_line_bytes` long: past that its bytes are dropped as they come, and the line comes as `TOO_LONG`
    (a line of whitespace alone is blank, whatever its length, as it is within a chunk).

    A run of blank lines comes as its count (an int): a file of newlines then costs a few C calls per chunk
    instead of Python work per line.
    """
    total = 0
    unfinished = _Unfinished(max_line_bytes)
    async for chunk in chunks:
        if not chunk:
            continue
        total += len(chunk)
        if total > max_bytes:
            raise file_too_large(max_bytes)
        end = chunk.find(b"\n")
        if end < 0:
            unfinished.add(chunk)  # a line longer than a chunk: its parts are joined once, at its end
            continue
        unfinished.add(chunk[:end])
        found: list[bytes | int | TooLong] = [unfinished.take()]
        unfinished.add(_chunk_lines(chunk, end + 1, found, max_line_bytes))
        yield found
    if not unfinished.empty:
        yield [unfinished.take()]


class _Unfinished:
    """The parts of the line being read, while it is at most `limit` bytes long (or blank: whitespace alone is
    kept as nothing)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._blank = True
        self._too_long = False

    @property
    def empty(self) -> bool:
        return self._size == 0

    def add(self, part: bytes) -> None:
        if not part:
            return
        self._size += len(part)
        self._blank = self._blank and _NOT_BLANK.search(part) is None
        if self._size <= self._limit:
            self._parts.append(part)
        else:
            self._parts = []
            self._too_long = not self._blank

    def take(self) -> bytes | TooLong:
        """The line (its end was found), and start the next one."""
        line: bytes | TooLong = TOO_LONG if self._too_long else b"".join(self._parts)
        self._parts, self._size, self._blank, self._too_long = [], 0, True, False
        return line


def _chunk_lines(chunk: bytes, position: int, found: list[bytes | int | TooLong], max_line_bytes: int) -> bytes:
    """Append the complete lines of `chunk` from `position` on to `found`; return the unfinished rest."""
    while True:
        content = _NOT_BLANK.search(chunk, position)
        if content is None:
            blanks = chunk.count(b"\n", position)
            if blanks:
                found.append(blanks)
            last = chunk.rfind(b"\n", position)
            return chunk[position if last < 0 else last + 1 :]
        previous = chunk.rfind(b"\n", position, content.start())
        start = position if previous < 0 else previous + 1
        blanks = chunk.count(b"\n", position, start)
        if blanks:
            found.append(blanks)
        end = chunk.find(b"\n", content.start())
        if end < 0:
            return chunk[start:]
        found.append(chunk[start:end] if end - start <= max_line_bytes else TOO_LONG)
        position = end + 1


def size_text(limit: int) -> str:
    """`10,485,760 bytes (10 MiB)`"""
    return f"{limit:,} bytes" + (f" ({limit // 2**20} MiB)" if limit % 2**20 == 0 else "")


def file_too_large(max_bytes: int) -> errors.ValidationError:
    size = size_text(max_bytes)
    reason = f"The file is larger than {size}, the limit; split it into smaller files."
    return errors.ValidationError(
        f"The file is larger than {size}, the limit; nothing was stored.",
        errors=[errors.LineError(0, reason)],
    )
