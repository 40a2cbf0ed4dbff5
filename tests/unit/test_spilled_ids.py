"""The custom_ids of a file kept on disk past a count (`service.SpilledIds`): the same answers as a dict, the
same validation outcome whichever keeps them and however many lines wait to be looked up, and memory that does
not grow with the number of lines."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade import errors
from fusillade.cli import local_run
from fusillade.domain import jsonl
from fusillade.service import SpilledIds
from tests.unit.jsonl_input import collect, line
from tests.unit.test_jsonl_properties import line_fragments

ids_in_order = st.lists(
    st.sampled_from(["a", "b", "A", "é", "e\u0301", "x" * 40, "c'\"\\", "😀", "7"]), max_size=40
)


@settings(max_examples=150, deadline=None)
@given(ids_in_order, st.lists(st.integers(1, 7), min_size=1, max_size=5), st.integers(0, 4))
def test_first_lines_are_those_of_a_dict(custom_ids: list[str], batch_sizes: list[int], in_memory: int) -> None:
    model: dict[str, int] = {}
    seen = SpilledIds(in_memory=in_memory)
    try:
        pairs = [(custom_id, number) for number, custom_id in enumerate(custom_ids, 1)]
        position, batch = 0, 0
        while position < len(pairs):
            size = batch_sizes[batch % len(batch_sizes)]
            ids = pairs[position : position + size]
            assert seen.first_lines(ids) == [model.setdefault(custom_id, number) for custom_id, number in ids]
            assert seen.batched == (len(model) > in_memory)
            position, batch = position + size, batch + 1
    finally:
        seen.close()
        seen.close()


def run(data: bytes, chunk_size: int, limits: jsonl.Limits, **options: Any) -> tuple[Any, ...]:
    chunks = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]
    templates, error = asyncio.run(collect(chunks, limits, **options))
    return templates, None if error is None else (error.message, error.errors)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        line_fragments | st.sampled_from([line("b"), line("a", body={"model": "nope"}), line("é")]), max_size=14
    ),
    st.integers(1, 60),
    st.integers(0, 3),
    st.integers(1, 4),
    st.integers(1, 12),
    st.integers(1, 3),
)
def test_the_ids_on_disk_give_the_outcome_of_the_ids_in_memory(
    fragments: list[bytes], chunk_size: int, in_memory: int, settle_lines: int, max_lines: int, max_errors: int
) -> None:
    data = b"".join(fragments)
    limits = jsonl.Limits(max_lines=max_lines, max_errors=max_errors)
    expected = run(data, len(data) or 1, limits, model_allowed=lambda model: model != "nope")
    with mock.patch.object(jsonl, "SETTLE_LINES", settle_lines):
        found = run(
            data,
            chunk_size,
            limits,
            model_allowed=lambda model: model != "nope",
            seen_ids=functools.partial(SpilledIds, in_memory=in_memory),
        )
    assert found == expected


async def test_a_duplicate_long_after_the_first_is_named_with_its_first_line() -> None:
    data = b"".join(line(f"r-{number}") for number in range(1, 301)) + line("r-7") + line("r-300")
    templates, error = await collect(
        [data[start : start + 1000] for start in range(0, len(data), 1000)],
        seen_ids=functools.partial(SpilledIds, in_memory=10),
    )
    assert len(templates) == 300
    assert error is not None
    assert [(item.line, item.reason.split(";")[0]) for item in error.errors] == [
        (301, "custom_id 'r-7' is used again (first on line 7)"),
        (302, "custom_id 'r-300' is used again (first on line 300)"),
    ]


async def test_the_run_command_finds_a_duplicate_among_ids_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SpilledIds, "IN_MEMORY", 5)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(line(f"r-{number}") for number in range(1, 21)) + line("r-2"))
    with pytest.raises(local_run.InvalidInput) as caught:
        await local_run.check_input(path, jsonl.Limits(), lambda model: True)
    assert [(item.line, "first on line 2" in item.reason) for item in caught.value.errors] == [(21, True)]


async def test_a_failing_temporary_database_is_a_storage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", refuse)
    seen = SpilledIds(in_memory=1)
    with pytest.raises(errors.StorageUnavailable, match="temporary directory"):
        seen.first_lines([("a", 1), ("b", 2)])


async def generated(lines: int) -> AsyncIterator[bytes]:
    """`lines` request lines, 1,000 a chunk, made as they are read."""
    for start in range(1, lines + 1, 1000):
        yield b"".join(line(f"request-{number}") for number in range(start, min(start + 1000, lines + 1)))


async def peak_while_validating(lines: int) -> int:
    tracemalloc.start()
    try:
        count = 0
        async for _ in jsonl.validate(
            generated(lines),
            jsonl.Limits(max_lines=lines),
            seen_ids=functools.partial(SpilledIds, in_memory=500),
        ):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == lines
    return peak


async def test_memory_does_not_grow_with_the_number_of_lines() -> None:
    with mock.patch.object(jsonl, "SETTLE_LINES", 1000):
        small, large = await peak_while_validating(5_000), await peak_while_validating(20_000)
    # A dict of the 15,000 more ids would hold about 1.8 MB more.
    assert large - small < 400_000, f"{small / 1e6:.2f} MB for 5,000 lines, {large / 1e6:.2f} MB for 20,000"
