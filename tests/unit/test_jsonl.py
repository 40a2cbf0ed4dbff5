"""Streaming validation of uploaded JSONL input files (`domain.jsonl`): good files, bad lines and limits, by
example. The properties (any bytes, round trips, chunking, the stored body) are in `test_jsonl_properties.py`."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from fusillade import errors
from fusillade.domain import jsonl, models, served
from tests.unit.jsonl_input import CHAT, collect, line


def without(key: str, raw: bytes) -> bytes:
    record = orjson.loads(raw)
    del record[key]
    return orjson.dumps(record) + b"\n"


async def reasons(data: bytes, *, chunks: int = 65536, **options: Any) -> list[tuple[int, str]]:
    """The (line, reason) pairs of the ValidationError that `data`, read in `chunks`-byte chunks, must raise."""
    return await reasons_of(jsonl.iterate_chunks(data, chunks), **options)


async def reasons_of(
    chunks: AsyncIterator[bytes], limits: jsonl.Limits = jsonl.DEFAULT_LIMITS, **options: Any
) -> list[tuple[int, str]]:
    _, error = await collect(chunks, limits, **options)
    assert error is not None, "the file was expected to be rejected"
    return [(item.line, item.reason) for item in error.errors]


# ------------------------------------------------------------------------------------- good files


async def test_good_lines_become_templates_in_order() -> None:
    data = line("a", body={"model": "gpt", "messages": [{"role": "user", "content": "hé"}]}) + line(
        "b", url="/v1/embeddings", body={"input": "x", "model": "emb"}
    )
    templates, error = await collect(jsonl.iterate_chunks(data))
    assert error is None
    assert templates == [
        models.TemplateInput(
            line_number=1,
            custom_id="a",
            method="POST",
            url=CHAT,
            model="gpt",
            body='{"model":"gpt","messages":[{"role":"user","content":"hé"}]}',
        ),
        models.TemplateInput(
            line_number=2,
            custom_id="b",
            method="POST",
            url="/v1/embeddings",
            model="emb",
            body='{"input":"x","model":"emb"}',
        ),
    ]


async def test_the_body_is_stored_exactly_as_written() -> None:
    body = (
        b'{ "model" : "m" , "n": 18446744073709551616, "tiny": 1e-99999, "s": "\\u00e9\\n", "z": 1.50, "a": [] }'
    )
    data = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",\t"body": ' + body + b" }\r\n"
    templates, error = await collect([data])
    assert error is None
    assert templates[0].body == body.decode(), "numbers, escapes, key order and spacing unchanged"


@pytest.mark.parametrize(
    "layout",
    [
        b'{"body": BODY, "custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}',
        b'{"custom_id": "a", "extra": {"body": {"model": "decoy"}}, "body": BODY, "method": "POST", "url": "URL"}',
        b'{"custom_id": "a", "body": {"model": "first"}, "method": "POST", "url": "URL", "body": BODY}',
        b'{"custom_id": "a", "method": "POST", "url": "URL", "body": {"model": "first"}, "bod\\u0079": BODY}',
        b'  {"custom_id":"a","method":"POST","url":"URL","note":[1,{"x":"}"}],"body":BODY}  ',
    ],
    ids=["body first", "decoy key", "body twice", "escaped key", "array before"],
)
async def test_the_body_a_json_reader_keeps_is_the_one_stored(layout: bytes) -> None:
    body = b'{"model": "m", "text": "a \\"quoted\\" } and ] brackets", "big": 123456789012345678901234567890}'
    data = layout.replace(b"BODY", body).replace(b"URL", CHAT.encode())
    templates, error = await collect([data])
    assert error is None, error.errors if error else None
    assert templates[0].body == body.decode()
    assert templates[0].model == "m"


async def test_a_body_with_a_lone_surrogate_escape_is_refused() -> None:
    data = line("a").replace(b'"model":"m"', b'"model":"m","x":"\\ud800"')
    [(number, reason)] = await reasons(data)
    assert number == 1
    assert reason.startswith("The line holds a lone surrogate escape (such as \\ud800 without its pair) at column")


async def test_a_line_over_the_line_limit_is_refused_without_being_kept() -> None:
    limits = jsonl.Limits(max_line_bytes=100)
    long_line = line("long", body={"model": "m", "text": "x" * 200})
    data = line("a") + long_line + line("b") + long_line.rstrip(b"\n")
    for chunk_size in (7, 64, 150, len(data)):
        found = await reasons(data, limits=limits, chunks=chunk_size)
        assert [number for number, _ in found] == [2, 4], chunk_size
        assert "longer than 100 bytes, the limit for one request line" in found[0][1]
    exactly = line("c", body={"model": "m", "t": "x" * (100 - len(line("c", body={"model": "m", "t": ""})) + 1)})
    templates, error = await collect(jsonl.iterate_chunks(exactly, 9), limits)
    assert error is None and len(templates) == 1, "a line of exactly max_line_bytes (line end excluded) is good"


async def test_memory_is_bounded_by_the_line_limit_not_by_the_line() -> None:
    megabyte = 2**20

    async def one_long_line() -> AsyncIterator[bytes]:
        yield b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "t": "'
        for _ in range(40):
            yield b"x" * megabyte  # a new chunk each time, as a stream's are
        yield b'"}}\n' + line("b")

    tracemalloc.start()
    try:
        templates, error = await collect(one_long_line(), jsonl.Limits(max_line_bytes=2 * megabyte))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error is not None and [item.line for item in error.errors] == [1]
    assert [template.custom_id for template in templates] == ["b"], "the lines after it are still read"
    assert peak < 6 * megabyte, f"{peak / megabyte:.1f} MiB held for a 40 MiB line with a 2 MiB limit"


async def test_a_model_name_over_256_characters_is_refused() -> None:
    ok = line("a", body={"model": "m" * 256})
    too_long = line("b", body={"model": "m" * 257})
    found = await reasons(ok + too_long, model_allowed=lambda model: True)
    assert found == [(2, "body.model is 257 characters long; a model name has at most 256.")]


async def test_crlf_line_endings_and_missing_final_newline_are_accepted() -> None:
    data = line("a").replace(b"\n", b"\r\n") + line("b").rstrip(b"\n")
    templates, error = await collect([data])
    assert error is None
    assert [(t.line_number, t.custom_id) for t in templates] == [(1, "a"), (2, "b")]


async def test_blank_lines_at_the_end_are_accepted() -> None:
    templates, error = await collect([line("a") + b"\n  \r\n\t\n\n"])
    assert error is None
    assert [t.custom_id for t in templates] == ["a"]


async def test_byte_order_mark_at_start_is_skipped() -> None:
    templates, error = await collect([b"\xef\xbb\xbf" + line("a")])
    assert error is None
    assert templates[0].custom_id == "a"


async def test_unknown_top_level_keys_are_ignored() -> None:
    templates, error = await collect([line("a", note="anything", extra={"x": 1})])
    assert error is None
    assert len(templates) == 1


async def test_every_allowed_url_is_accepted() -> None:
    data = b"".join(line(str(n), url=url) for n, url in enumerate(sorted(jsonl.SUPPORTED_URLS)))
    templates, error = await collect([data])
    assert error is None
    assert {t.url for t in templates} == jsonl.SUPPORTED_URLS


async def test_custom_id_length_is_counted_in_characters() -> None:
    templates, error = await collect([line("é" * 512)])
    assert error is None
    assert templates[0].custom_id == "é" * 512


async def test_model_allowed_is_asked_about_each_model() -> None:
    asked: list[str] = []

    def allowed(model: str) -> bool:
        asked.append(model)
        return True

    templates, error = await collect(
        [line("a", body={"model": "x"}) + line("b", body={"model": "y"})], model_allowed=allowed
    )
    assert error is None
    assert asked == ["x", "y"]
    assert len(templates) == 2


async def test_templates_are_yielded_while_the_stream_is_still_being_read() -> None:
    produced = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal produced
        for n in range(3):
            produced += 1
            yield line(f"r{n}")

    seen_when_yielded = [produced async for _ in jsonl.validate(source())]
    assert seen_when_yielded == [1, 2, 3]


async def test_a_line_longer_than_many_chunks_is_joined() -> None:
    long_body = {"model": "m", "prompt": "x" * 10_000}
    templates, error = await collect(jsonl.iterate_chunks(line("a", body=long_body) + line("b"), chunk_size=7))
    assert error is None
    assert orjson.loads(templates[0].body) == long_body
    assert [t.line_number for t in templates] == [1, 2]


# -------------------------------------------------------------------------------------- bad lines


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json}\n", "The line is not valid JSON (unexpected character, expected a string key at column 2)"),
        (b'{"custom_id": "a\xff"}\n', "The line is not valid UTF-8 (byte 17 cannot be decoded)"),
        (b"[1, 2]\n", "The line is an array, not a JSON object"),
        (b'"text"\n', "The line is the string 'text', not a JSON object"),
        (b"null\n", "The line is null, not a JSON object"),
        (without("custom_id", line()), "custom_id is missing; it must be a non-empty string"),
        (line(7), "custom_id must be a non-empty string that is unique within the file, not the number 7."),
        (line(""), "custom_id must be a non-empty string that is unique within the file, not an empty string."),
        (line(None), "custom_id must be a non-empty string that is unique within the file, not null."),
        (line("x" * 513), "custom_id is 513 characters long; the limit is 512."),
        (without("method", line()), 'method is missing; it must be "POST".'),
        (line(method="GET"), "method must be \"POST\", not the string 'GET'."),
        (line(method="post"), "method must be \"POST\", not the string 'post'."),
        (line(method=True), 'method must be "POST", not the boolean true.'),
        (without("url", line()), "url is missing; it must be an endpoint path"),
        (
            line(url=["/v1/chat/completions"]),
            "url must be an endpoint path such as '/v1/chat/completions', not an array.",
        ),
        (
            line(url="/v1/images/generations"),
            "url '/v1/images/generations' is not a supported endpoint; use one of",
        ),
        (line(url="https://api.example.com/v1/chat/completions"), "names a host; give only the path"),
        (line(url="//169.254.169.254/v1/chat/completions"), "the host comes from the server's routing table"),
        (without("body", line()), "body is missing; it must be a JSON object"),
        (
            line(body="text"),
            "body must be a JSON object holding the request for the upstream, not the string 'text'.",
        ),
        (line(body={"messages": []}), "body.model is missing; it must be a non-empty string naming the model."),
        (line(body={"model": ""}), "body.model must be a non-empty string naming the model, not an empty string."),
        (line(body={"model": 4.5}), "body.model must be a non-empty string naming the model, not the number 4.5."),
        (line(body={"model": {}}), "body.model must be a non-empty string naming the model, not an object."),
    ],
)
async def test_each_kind_of_bad_line_is_reported_with_a_specific_reason(raw: bytes, expected: str) -> None:
    found = await reasons(line("ok") + raw)
    assert len(found) == 1
    number, reason = found[0]
    assert number == 2
    assert expected in reason
    assert "Line" not in reason, "the line number is carried by LineError.line, not repeated in the reason"


async def test_unsupported_url_message_lists_the_supported_paths() -> None:
    [(_, reason)] = await reasons(line(url="/v1/x"))
    assert all(path in reason for path in jsonl.SUPPORTED_URLS)


async def test_long_values_are_cut_in_messages() -> None:
    [(_, reason)] = await reasons(line(method="G" * 10_000))
    assert len(reason) < 200
    assert "…" in reason


async def test_duplicate_custom_ids_name_the_first_line() -> None:
    data = line("a") + line("b") + line("a") + line("a")
    found = await reasons(data)
    expected = "custom_id 'a' is used again (first on line 1); every custom_id must be unique within the file."
    assert found == [(3, expected), (4, expected)]


async def test_a_custom_id_taken_by_a_bad_line_is_still_taken() -> None:
    found = await reasons(line("a", method="GET") + line("a"))
    assert [number for number, _ in found] == [1, 2]
    assert "used again (first on line 1)" in found[1][1]


async def test_model_without_a_route_is_rejected() -> None:
    found = await reasons(line("a", body={"model": "nope"}), model_allowed=lambda model: model == "m")
    assert found == [(1, "model 'nope' has no route configured on this server; use a model it serves.")]


async def test_the_first_line_without_a_route_names_the_served_models() -> None:
    routing = served.ServedModels.of(
        [f"model-{index:02}" for index in range(23)], default_route=False, now=datetime.now(UTC)
    )
    names = ", ".join(f"model-{index:02}" for index in range(20))
    lines = [("a", "gpt-9"), ("b", "model-01"), ("c", "x")]
    data = b"".join(line(custom_id, body={"model": model}) for custom_id, model in lines)
    templates, error = await collect(jsonl.iterate_chunks(data), routing=routing)

    assert [template.custom_id for template in templates] == ["b"]  # served.accepts decides
    assert error is not None
    assert [(item.line, item.reason) for item in error.errors] == [
        (1, f"model 'gpt-9' has no route configured on this server; served models: {names} (and 3 more)."),
        (3, "model 'x' has no route configured on this server; the served models are named on line 1."),
    ]


async def test_good_lines_are_yielded_before_the_final_error() -> None:
    templates, error = await collect([line("a") + b"oops\n" + line("b")])
    assert [t.custom_id for t in templates] == ["a", "b"]
    assert error is not None
    assert error.message == "The file has 1 invalid line; nothing was stored."
    assert [(e.line, e.reason.split(" (")[0]) for e in error.errors] == [(2, "The line is not valid JSON")]


async def test_blank_lines_before_a_request_are_errors() -> None:
    found = await reasons(line("a") + b"\n \r\n" + line("b") + b"\n")
    empty = "The line is empty; blank lines are allowed only at the end of the file."
    assert found == [(2, empty), (3, empty)]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
async def test_blank_runs_across_chunks_keep_their_line_numbers(chunk_size: int) -> None:
    data = line("a") + b"\n\n \r\n" * 4 + line("b") + b" \n" * 5
    _, error = await collect(jsonl.iterate_chunks(data, chunk_size), jsonl.Limits(max_errors=20))
    assert error is not None
    assert [e.line for e in error.errors] == list(range(2, 14))


async def test_a_blank_first_line_is_an_error() -> None:
    assert [number for number, _ in await reasons(b"\n" + line("a"))] == [1]


@pytest.mark.parametrize("data", [b"", b"\n", b"\r\n  \n\t\n", b"\xef\xbb\xbf"])
async def test_a_file_without_requests_is_rejected(data: bytes) -> None:
    templates, error = await collect([data])
    assert templates == []
    assert error is not None
    assert error.message == "The file contains no requests."
    assert [(e.line, e.reason) for e in error.errors] == [(0, "The file contains no requests.")]


async def test_bad_lines_past_max_errors_are_counted_in_a_summary() -> None:
    data = b"".join(line(str(n), method="GET") for n in range(1, 151))
    _, error = await collect([data], jsonl.Limits(max_errors=100))
    assert error is not None
    assert error.message == "The file has 150 invalid lines; nothing was stored."
    assert [e.line for e in error.errors] == [*range(1, 101), 0]
    assert error.errors[-1].reason == "… and 50 more bad lines (only the first 100 are listed)."


async def test_a_long_run_of_blank_lines_is_capped_too() -> None:
    _, error = await collect([b"\n" * 1000 + line("a")], jsonl.Limits(max_errors=3))
    assert error is not None
    assert error.message == "The file has 1000 invalid lines; nothing was stored."
    assert [e.line for e in error.errors] == [1, 2, 3, 0]
    assert error.errors[-1].reason.startswith("… and 997 more bad lines")


# ----------------------------------------------------------------------------------------- limits


async def endless_lines(counter: list[int]) -> AsyncIterator[bytes]:
    for n in itertools.count():
        counter[0] += 1
        yield line(f"r{n}")


async def test_too_many_lines_raises_at_once() -> None:
    read = [0]
    templates, error = await collect(endless_lines(read), jsonl.Limits(max_lines=5))
    assert error is not None
    assert len(templates) == 5
    assert read[0] == 6, "reading must stop at the first line over the limit"
    assert error.errors == [
        errors.LineError(6, "The file has more than 5 requests; the limit is 5. Split it into smaller files.")
    ]
    assert "more than 5 requests" in error.message


async def test_too_many_lines_keeps_the_errors_found_before() -> None:
    data = line("a", method="GET") + b"".join(line(str(n)) for n in range(3))
    _, error = await collect([data], jsonl.Limits(max_lines=3))
    assert error is not None
    assert [e.line for e in error.errors] == [1, 4]


async def test_exactly_max_lines_with_trailing_blank_lines_is_accepted() -> None:
    data = b"".join(line(str(n)) for n in range(3)) + b"\n\n"
    templates, error = await collect([data], jsonl.Limits(max_lines=3))
    assert error is None
    assert len(templates) == 3


async def test_too_many_bytes_raises_at_once() -> None:
    read = [0]
    _, error = await collect(endless_lines(read), jsonl.Limits(max_bytes=10_000))
    assert error is not None
    assert read[0] * len(line("r1")) < 10_000 + 2 * len(line("r1000"))
    [problem] = error.errors
    assert problem.line == 0
    assert problem.reason == "The file is larger than 10,000 bytes, the limit; split it into smaller files."


async def test_size_limit_message_names_mebibytes() -> None:
    _, error = await collect([b"x" * (2 * 2**20 + 1)], jsonl.Limits(max_bytes=2 * 2**20))
    assert error is not None
    assert "2,097,152 bytes (2 MiB)" in error.errors[0].reason


async def test_a_file_of_exactly_max_bytes_is_accepted() -> None:
    data = line("a")
    templates, error = await collect([data], jsonl.Limits(max_bytes=len(data)))
    assert error is None
    assert len(templates) == 1


@pytest.mark.parametrize(
    "options",
    [
        {"max_lines": 0},
        {"max_bytes": 0},
        {"max_line_bytes": 0},
        {"max_custom_id_length": 0},
        {"max_errors": -1},
        {"allowed_urls": frozenset()},
    ],
)
def test_limits_reject_nonsense(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Limits"):
        jsonl.Limits(**options)


async def test_iterate_chunks_splits_and_rejects_a_zero_size() -> None:
    assert [chunk async for chunk in jsonl.iterate_chunks(b"abcdefg", 3)] == [b"abc", b"def", b"g"]
    with pytest.raises(ValueError, match="chunk_size"):
        [chunk async for chunk in jsonl.iterate_chunks(b"abc", 0)]
