"""The body of a request sent to a streaming route: the user's body with `"stream": true` and, unless the endpoint
has no such option (responses), `"stream_options": {"include_usage": true}`, added without re-serialising
anything else (numbers, escapes, key order and spacing stay as the user wrote them).

- Neither key present (the usual case): both are added at the end of the object.
- `stream` present (one or more times, any value): each value becomes `true`.
- `stream_options` present: where it is an object, its `include_usage` becomes `true` (added when missing); where
  it is anything else, it becomes `{"include_usage": true}`. The user's other stream options stay.

So the upstream always streams and reports usage, whatever the user set, as fusillade reassembles the stream into
the non-streaming shape and counts usage.
"""

from __future__ import annotations

from typing import Final

from fusillade.domain import json_spans

_TRUE: Final = b"true"
_STREAM: Final = b'"stream":true'
_USAGE: Final = b'"include_usage":true'
_OPTIONS: Final = b'"stream_options":{' + _USAGE + b"}"
_WHITESPACE: Final = frozenset(b" \t\r\n")


def streaming_body(body: bytes, *, usage: bool) -> bytes | None:
    """`body` (a JSON object as text) asking for a stream, with usage if `usage`; None if it is not an object."""
    if b"\\u" not in body and b'"stream' not in body:
        # No key can be named stream or stream_options (only a \u escape could spell one): add both at the end.
        bounds = _object_bounds(body)
        if bounds is None:
            return None
        opening, closing = bounds
        fields = _STREAM + (b"," + _OPTIONS if usage else b"")
        empty = _skip_whitespace(body, opening + 1, closing) == closing
        return body[:closing] + (fields if empty else b"," + fields) + body[closing:]
    try:
        found = json_spans.object_at(body)
    except ValueError:
        return None
    if found is None:
        return None
    edits: list[tuple[int, int, bytes]] = []
    added: list[bytes] = []
    streams = [member for member in found.members if member.key == "stream"]
    edits += [(member.start, member.end, _TRUE) for member in streams if body[member.start : member.end] != _TRUE]
    if not streams:
        added.append(_STREAM)
    if usage:
        options = [member for member in found.members if member.key == "stream_options"]
        for member in options:
            edits += _with_usage(body, member)
        if not options:
            added.append(_OPTIONS)
    if added:
        edits.append(json_spans.add_members(body, found, b",".join(added)))
    return json_spans.splice(body, edits)


def _with_usage(body: bytes, options: json_spans.Member) -> list[tuple[int, int, bytes]]:
    """The edits that set `include_usage: true` in the `stream_options` value `options`."""
    inner = json_spans.object_at(body, options.start)
    if inner is None:
        return [(options.start, options.end, b"{" + _USAGE + b"}")]
    flags = [member for member in inner.members if member.key == "include_usage"]
    if not flags:
        return [json_spans.add_members(body, inner, _USAGE)]
    return [(member.start, member.end, _TRUE) for member in flags if body[member.start : member.end] != _TRUE]


def _object_bounds(body: bytes) -> tuple[int, int] | None:
    """Where the opening and the closing brace of the object `body` are, or None if `body` is not an object."""
    opening = _skip_whitespace(body, 0, len(body))
    closing = len(body) - 1
    while closing > opening and body[closing] in _WHITESPACE:
        closing -= 1
    if closing <= opening or body[opening] != ord("{") or body[closing] != ord("}"):
        return None
    return opening, closing


def _skip_whitespace(body: bytes, position: int, end: int) -> int:
    while position < end and body[position] in _WHITESPACE:
        position += 1
    return position
