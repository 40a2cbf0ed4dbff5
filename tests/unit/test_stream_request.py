"""The body of a streamed request (`upstream.stream_request`): fusillade's stream fields spliced into the user's
bytes, nothing else changed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.upstream.stream_request import streaming_body

USAGE = {"include_usage": True}


def expected(body: dict[str, Any], usage: bool) -> dict[str, Any]:
    """What the upstream must read: the body, streaming, with usage asked for (other options kept)."""
    result = {**body, "stream": True}
    if usage:
        options = body.get("stream_options")
        result["stream_options"] = {**options, **USAGE} if isinstance(options, dict) else USAGE
    return result


def test_the_usual_body_gets_both_fields_at_its_end_and_keeps_its_bytes() -> None:
    body = b'{"model": "m", "n": 18446744073709551616, "p": 1e-99999, "s": "\\u00e9"}'
    sent = streaming_body(body, usage=True)
    assert sent == body[:-1] + b',"stream":true,"stream_options":{"include_usage":true}}'
    assert streaming_body(body, usage=False) == body[:-1] + b',"stream":true}'
    assert streaming_body(b" { } \n", usage=False) == b' { "stream":true} \n'


@pytest.mark.parametrize(
    ("body", "usage", "sent"),
    [
        (b'{"stream": false, "model": "m"}', False, b'{"stream": true, "model": "m"}'),
        (b'{"stream": true, "model": "m"}', False, b'{"stream": true, "model": "m"}'),
        (b'{"stream":0,"stream":null}', False, b'{"stream":true,"stream":true}'),
        (
            b'{"m": 1, "stream_options": {"x": 2}}',
            True,
            b'{"m": 1, "stream_options": {"x": 2,"include_usage":true},"stream":true}',
        ),
        (
            b'{"stream_options": {"include_usage": false}, "stream": true}',
            True,
            b'{"stream_options": {"include_usage": true}, "stream": true}',
        ),
        (b'{"stream_options": null}', True, b'{"stream_options": {"include_usage":true},"stream":true}'),
        (b'{"stream_options": {"x": 2}}', False, b'{"stream_options": {"x": 2},"stream":true}'),
        (b'{"strea\\u006d": false}', False, b'{"strea\\u006d": true}'),
    ],
)
def test_fields_the_user_set_are_overridden_in_place(body: bytes, usage: bool, sent: bytes) -> None:
    assert streaming_body(body, usage=usage) == sent


@pytest.mark.parametrize("body", [b"[1]", b'"text"', b"", b"null", b"{", b'{"a": 1'])
def test_a_body_that_is_not_an_object_is_refused(body: bytes) -> None:
    assert streaming_body(body, usage=True) is None


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
keys = st.sampled_from(["model", "stream", "stream_options", "include_usage", "x", "strea\u006d"]) | st.text(
    max_size=5
)
option_values = json_values | st.dictionaries(st.sampled_from(["include_usage", "other"]), json_values, max_size=2)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, option_values, max_size=5), st.booleans(), st.booleans())
def test_the_upstream_reads_the_body_with_streaming_and_usage(
    body: dict[str, Any], usage: bool, ascii_escapes: bool
) -> None:
    text = json.dumps(body, ensure_ascii=ascii_escapes).encode()
    sent = streaming_body(text, usage=usage)
    assert sent is not None
    # json, not orjson: an integer beyond 64 bits must read back as the same integer, not a float.
    assert json.loads(sent) == expected(body, usage)
