"""Where things are in a JSON text, so that a user's JSON can be passed on byte for byte: the members of an
object (each key, and where its value starts and ends) found without building the values, and members added to
an object or values replaced in it without touching the rest.

The text must already be valid JSON (`orjson.loads` accepted it): these functions only find boundaries. On text
that is not valid JSON they raise `ValueError`, or give boundaries that mean nothing; they never loop forever.

The work per value is a few regular-expression matches per bracket, not per character: strings and scalars are
skipped by the regex engine, so a body of long strings costs about what reading it costs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import orjson

_WHITESPACE: Final = re.compile(rb"[ \t\r\n]*+")
_STRING: Final = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_KEY: Final = re.compile(rb'[ \t\r\n]*+("[^"\\]*+(?:\\.[^"\\]*+)*+")[ \t\r\n]*+:[ \t\r\n]*+', re.DOTALL)
"""A member's key and its colon, with the whitespace around them."""
_SEPARATOR: Final = re.compile(rb"[ \t\r\n]*+([,}])")
_SCALAR: Final = re.compile(rb"[-+.0-9A-Za-z]++")
_TO_NEXT_BRACKET: Final = re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL)
"""Everything up to the next bracket that is not inside a string."""
_OPEN: Final = frozenset(b"[{")
_CLOSE: Final = frozenset(b"]}")
_QUOTE: Final = ord('"')


class Member(NamedTuple):
    """One `"key": value` of an object: `text[start:end]` is the value exactly as written."""

    key: str
    start: int
    end: int
    depth: int
    """How deeply the value nests: 0 for a string, number, boolean or null, 1 for `[]` or `{"a": 1}`, ..."""


@dataclass(frozen=True, slots=True)
class JsonObject:
    """An object found in a text: its members in the order written (a key written twice appears twice), and
    `text[start:end]` is the whole object, braces included."""

    members: Sequence[Member]
    start: int
    end: int

    def last(self, key: str) -> Member | None:
        """The member a JSON reader keeps for `key` (the last one written), or None."""
        for member in reversed(self.members):
            if member.key == key:
                return member
        return None


def object_at(text: bytes, position: int = 0) -> JsonObject | None:
    """The object whose value starts at `position` (whitespace before it is skipped); None if the value there is
    not an object."""
    position = _skip_whitespace(text, position)
    if position >= len(text) or text[position] != ord("{"):
        return None
    start = position
    found: list[Member] = []
    separator = _SEPARATOR.match(text, position + 1)
    if separator is not None and separator.group(1) == b"}":
        return JsonObject(found, start, separator.end())
    position += 1
    while True:
        key = _KEY.match(text, position)
        if key is None:
            raise ValueError(f"expected a key at byte {position}")
        value_start = key.end()
        value_end, depth = value_span(text, value_start)
        found.append(Member(_key(key.group(1)), value_start, value_end, depth))
        separator = _SEPARATOR.match(text, value_end)
        if separator is None:
            raise ValueError(f"expected ',' or '}}' at byte {value_end}")
        position = separator.end()
        if separator.group(1) == b"}":
            return JsonObject(found, start, position)


def value_span(text: bytes, start: int) -> tuple[int, int]:
    """(end, depth) of the value starting at `start` (no whitespace before it): `text[start:end]` is the value;
    depth as `Member.depth`."""
    first = _at(text, start)
    if first == _QUOTE:
        return _string_end(text, start), 0
    if first in _OPEN:
        return _container_end(text, start)
    found = _SCALAR.match(text, start)
    if found is None or found.end() == start:
        raise ValueError(f"no JSON value at byte {start}")
    return found.end(), 0


def splice(text: bytes, edits: Sequence[tuple[int, int, bytes]]) -> bytes:
    """`text` with each `(start, end, replacement)` applied: `text[start:end]` replaced (an insertion when
    `start == end`). The edits must not overlap."""
    parts: list[bytes] = []
    position = 0
    for start, end, replacement in sorted(edits, key=lambda edit: (edit[0], edit[1])):
        if start < position:
            raise ValueError("overlapping edits")
        parts += (text[position:start], replacement)
        position = end
    parts.append(text[position:])
    return b"".join(parts)


def add_members(text: bytes, found: JsonObject, members: bytes) -> tuple[int, int, bytes]:
    """The edit that adds `members` (`"key":value` pairs joined by commas) at the end of the object `found`."""
    close = found.end - 1
    return close, close, (b"," + members if found.members else members)


def _container_end(text: bytes, start: int) -> tuple[int, int]:
    depth = deepest = 0
    position = start
    size = len(text)
    while position < size:
        bracket = text[position]
        if bracket in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in _CLOSE:
            depth -= 1
            if depth == 0:
                return position + 1, deepest
        else:
            raise ValueError(f"expected a bracket at byte {position}")
        position = _match_end(_TO_NEXT_BRACKET, text, position + 1)
    raise ValueError(f"the value starting at byte {start} does not end")


def _string_end(text: bytes, start: int) -> int:
    found = _STRING.match(text, start)
    if found is None:
        raise ValueError(f"expected a string at byte {start}")
    return found.end()


def _key(raw: bytes) -> str:
    if b"\\" not in raw:
        return raw[1:-1].decode()
    key = orjson.loads(raw)
    assert isinstance(key, str)
    return key


def _skip_whitespace(text: bytes, position: int) -> int:
    return _match_end(_WHITESPACE, text, position)


def _match_end(pattern: re.Pattern[bytes], text: bytes, position: int) -> int:
    """The end of `pattern`'s match at `position` (the pattern matches the empty string: it always matches)."""
    found = pattern.match(text, position)
    assert found is not None
    return found.end()


def _at(text: bytes, position: int) -> int:
    return text[position] if position < len(text) else -1
