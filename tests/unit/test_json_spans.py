"""Spans of JSON text (`domain.json_spans`): members found where a JSON reader finds them, values as written."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.domain import json_spans

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]))
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
tricky_text = st.sampled_from(['"', "\\", "}", "]", "{", "[", ",", ":", '\\"}', "\\\\", "é", "\u2028", "\n"])


def written(value: Any, style: int) -> bytes:
    """`value` in one of several writers' styles."""
    if style == 0:
        return json.dumps(value, separators=(",", ":")).encode()
    if style == 1:
        return json.dumps(value, indent=1).encode()
    if style == 2:
        return json.dumps(value, separators=(" , ", " :\t")).encode()
    return json.dumps(value, ensure_ascii=False).encode()


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=6) | tricky_text, json_values | tricky_text, max_size=6), st.integers(0, 3)
)
def test_each_member_is_found_with_its_value_as_written(value: dict[str, Any], style: int) -> None:
    text = b"  " + written(value, style) + b"\n"
    found = json_spans.object_at(text)
    assert found is not None
    assert [member.key for member in found.members] == list(value)
    assert {member.key: json.loads(text[member.start : member.end]) for member in found.members} == value
    assert json.loads(text[found.start : found.end]) == value
    for member in found.members:
        end, depth = json_spans.value_span(text, member.start)
        assert (end, depth) == (member.end, member.depth)


def test_depth_counts_the_levels_of_a_value() -> None:
    text = b'{"a": 1, "b": [], "c": {"d": [[{}]]}, "e": "[[[["}'
    found = json_spans.object_at(text)
    assert found is not None
    assert {member.key: member.depth for member in found.members} == {"a": 0, "b": 1, "c": 4, "e": 0}


def test_a_key_written_twice_appears_twice_and_the_last_is_kept() -> None:
    text = b'{"k": 1, "\\u006b": 2, "other": {"k": 3}}'
    found = json_spans.object_at(text)
    assert found is not None
    assert [member.key for member in found.members] == ["k", "k", "other"]
    last = found.last("k")
    assert last is not None and text[last.start : last.end] == b"2"
    assert found.last("missing") is None


@pytest.mark.parametrize("text", [b"[1]", b'"x"', b"1", b"", b"   "])
def test_a_value_that_is_not_an_object_has_no_members(text: bytes) -> None:
    assert json_spans.object_at(text) is None


@pytest.mark.parametrize("text", [b'{"a": 1', b'{"a" 1}', b'{"a": [1}', b'{"a": 1 "b": 2}', b'{"a": }', b"{1: 2}"])
def test_text_that_is_not_json_raises_value_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        json_spans.object_at(text)


def test_splice_replaces_and_inserts_in_order() -> None:
    text = b'{"a": 1, "b": 2}'
    found = json_spans.object_at(text)
    assert found is not None
    first = found.members[0]
    edits = [json_spans.add_members(text, found, b'"c":3'), (first.start, first.end, b"10")]
    assert json_spans.splice(text, edits) == b'{"a": 10, "b": 2,"c":3}'
    empty = json_spans.object_at(b"{ }")
    assert empty is not None
    assert json_spans.splice(b"{ }", [json_spans.add_members(b"{ }", empty, b'"c":3')]) == b'{ "c":3}'
    with pytest.raises(ValueError, match="overlapping"):
        json_spans.splice(text, [(1, 5, b""), (3, 6, b"")])
