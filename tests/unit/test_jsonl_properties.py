"""Streaming validation of uploaded JSONL input files (`domain.jsonl`), property-based: arbitrary bytes raise
nothing but `ValidationError`, valid lines round-trip, chunking never changes the outcome (under tight limits
too), and the stored body is the text of the line whatever the writer's style."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.domain import jsonl
from tests.support import strategies
from tests.unit.jsonl_input import CHAT, collect, line

json_values = strategies.json_values(max_leaves=12)
names = st.characters(exclude_categories=["Cc", "Cs"])
"""custom_ids and model names: any character but control characters (refused in both)."""
bodies = st.builds(
    lambda model, rest: {**rest, "model": model},
    st.text(names, min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
requests = st.lists(
    st.tuples(st.text(names, min_size=1, max_size=40), st.sampled_from(sorted(jsonl.SUPPORTED_URLS)), bodies),
    min_size=1,
    max_size=10,
    unique_by=lambda request: request[0],
)
line_fragments = st.sampled_from(
    [
        line("a"),
        line("a"),
        line("b", method="GET"),
        line("c", url="http://x/v1/embeddings"),
        line("d", body={"model": ""}),
        b"\n",
        b"\r\n",
        b"  \n",
        b"{",
        b"}\n",
        b"\xff\n",
        b"\xef\xbb\xbf",
        b'"custom_id"',
        b"[]\n",
    ]
)
messy_files = st.lists(line_fragments | st.binary(max_size=20), max_size=15).map(b"".join)


def run(
    data: bytes, chunk_sizes: list[int] | None = None, limits: jsonl.Limits = jsonl.DEFAULT_LIMITS
) -> tuple[Any, ...]:
    """Validate `data` split into chunks of the given sizes (cycled); a comparable summary of the outcome."""
    chunks = []
    sizes = itertools.cycle(chunk_sizes or [len(data) or 1])
    position = 0
    while position < len(data):
        size = next(sizes)
        chunks.append(data[position : position + size])
        position += size
    templates, error = asyncio.run(collect(chunks, limits))
    return templates, None if error is None else (error.message, error.errors)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | messy_files)
def test_arbitrary_bytes_raise_nothing_but_validation_error(data: bytes) -> None:
    templates, failure = run(data)
    assert [t.line_number for t in templates] == sorted({t.line_number for t in templates})
    if failure is not None:
        message, problems = failure
        assert message
        assert problems
        assert all(problem.reason for problem in problems)


@settings(max_examples=100, deadline=None)
@given(requests, st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_valid_lines_round_trip(
    request_list: list[tuple[str, str, dict[str, Any]]], newline: bytes, final_newline: bool
) -> None:
    data = newline.join(
        orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})
        for custom_id, url, body in request_list
    ) + (newline if final_newline else b"")
    templates, failure = run(data)
    assert failure is None
    assert [(t.line_number, t.custom_id, t.method, t.url, t.model) for t in templates] == [
        (number, custom_id, "POST", url, body["model"])
        for number, (custom_id, url, body) in enumerate(request_list, 1)
    ]
    assert [orjson.loads(t.body) for t in templates] == [body for _, _, body in request_list]


@settings(max_examples=150, deadline=None)
@given(messy_files, st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_chunking_does_not_change_the_outcome(data: bytes, chunk_sizes: list[int]) -> None:
    assert run(data, chunk_sizes) == run(data)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(line_fragments, max_size=12).map(b"".join),
    st.lists(st.integers(1, 30), min_size=1, max_size=4),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 120),
)
def test_chunking_does_not_change_the_outcome_under_tight_limits(
    data: bytes, chunk_sizes: list[int], max_lines: int, max_errors: int, max_line_bytes: int
) -> None:
    limits = jsonl.Limits(max_lines=max_lines, max_errors=max_errors, max_line_bytes=max_line_bytes)
    assert run(data, chunk_sizes, limits) == run(data, limits=limits)


def written(value: Any, style: int) -> str:
    """`value` as JSON text in one of a few writers' styles (spacing, indentation, escapes)."""
    if style == 0:
        return orjson.dumps(value).decode()
    if style == 1:
        return json.dumps(value, indent=2).replace("\n", " ")  # ASCII escapes, spaces, but one line
    return json.dumps(value, separators=(" ,", " : "), ensure_ascii=False)


big_numbers = st.sampled_from(["18446744073709551616", "-1e-99999", "1.000", "12345678901234567890123", "0.1e2"])


@settings(max_examples=150, deadline=None)
@given(
    bodies,
    st.integers(0, 2),
    st.permutations(["custom_id", "method", "url", "body", "note"]),
    json_values,
    big_numbers,
)
def test_the_stored_body_is_the_text_of_the_line(
    body: dict[str, Any], style: int, order: list[str], note: Any, number: str
) -> None:
    body_text = written(body, style)
    body_text = body_text[:-1] + (", " if len(body) else "") + f'"number": {number}' + "}"
    values = {"custom_id": '"r"', "method": '"POST"', "url": f'"{CHAT}"', "body": body_text}
    values["note"] = written(note, style)
    data = ("{" + ", ".join(f'"{key}": {values[key]}' for key in order) + "}\n").encode()
    templates, failure = run(data)
    assert failure is None, failure
    assert templates[0].body == body_text
