"""Identifiers and their wire forms (`domain.ids`)."""

from __future__ import annotations

import string
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade import errors
from fusillade.domain import ids

KINDS: list[tuple[str, Callable[[Any], str], Callable[[str], Any]]] = [
    (ids.FILE_PREFIX, ids.file_wire, ids.parse_file_id),
    (ids.BATCH_PREFIX, ids.batch_wire, ids.parse_batch_id),
    (ids.REQUEST_PREFIX, ids.request_wire, ids.parse_request_id),
]
HEX = "0123456789abcdef" * 2


@pytest.mark.parametrize(("prefix", "wire", "parse"), KINDS)
def test_wire_form_is_prefix_and_32_lowercase_hex(
    prefix: str, wire: Callable[[Any], str], parse: Callable[[str], Any]
) -> None:
    value = uuid.UUID("0123456789ABCDEF0123456789ABCDEF")
    assert wire(value) == prefix + "0123456789abcdef0123456789abcdef"
    assert parse(wire(value)) == value


def test_new_ids_are_random_uuid4() -> None:
    made = [
        ids.new_file_id(),
        ids.new_batch_id(),
        ids.new_request_id(),
        ids.new_template_id(),
        ids.new_daemon_id(),
    ]
    assert all(isinstance(value, uuid.UUID) and value.version == 4 for value in made)
    assert len(set(made)) == len(made)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "file-",
        "file-" + HEX[:31],
        "file-" + HEX + "0",
        "File-" + HEX,
        "batch_" + HEX,
        "file-" + "g" * 32,
        "file-+" + HEX[:31],
        "file-0_" + HEX[:30],
        "file- " + HEX[:31],
        "file-" + HEX[:31] + "\n",
        "file-" + "\u0660" * 32,
        "file-{" + HEX[:30] + "}",
    ],
)
def test_malformed_file_ids_are_not_found(text: str) -> None:
    with pytest.raises(errors.NotFound, match="No file with id"):
        ids.parse_file_id(text)


def test_a_request_id_is_not_a_batch_id() -> None:
    request_wire = ids.request_wire(ids.new_request_id())
    with pytest.raises(errors.NotFound, match="No batch"):
        ids.parse_batch_id(request_wire)
    with pytest.raises(errors.NotFound, match="No request"):
        ids.parse_request_id(ids.batch_wire(ids.new_batch_id()))


@settings(max_examples=100, deadline=None)
@given(st.uuids(), st.sampled_from(KINDS))
def test_every_id_round_trips(
    value: uuid.UUID, kind: tuple[str, Callable[[Any], str], Callable[[str], Any]]
) -> None:
    _, wire, parse = kind
    assert parse(wire(value)) == value


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.text(alphabet=string.hexdigits + "-_+ {}xg\n\u0660", min_size=30, max_size=34) | st.text(),
)
def test_parse_accepts_exactly_32_hex_digits(
    kind: tuple[str, Callable[[Any], str], Callable[[str], Any]], tail: str
) -> None:
    prefix, wire, parse = kind
    well_formed = len(tail) == 32 and all(character in string.hexdigits for character in tail)
    try:
        value = parse(prefix + tail)
    except errors.NotFound:
        assert not well_formed
    else:
        assert well_formed
        assert wire(value) == prefix + tail.lower()
