"""The incremental SSE parser (`upstream.sse`): WHATWG line and field rules, splits, limits, arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.upstream import sse
from fusillade.upstream.sse import Event, SSEError, SSEParser


def parse(data: bytes, **options: int) -> list[Event]:
    parser = SSEParser(**options)
    return parser.feed(data) + parser.finish()


def parse_split(data: bytes, cuts: list[int], **options: int) -> list[Event]:
    parser = SSEParser(**options)
    events: list[Event] = []
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        events += parser.feed(data[previous:cut])
        previous = cut
    return events + parser.finish()


def test_data_lines_are_joined_and_a_blank_line_dispatches() -> None:
    assert parse(b"data: one\ndata: two\n\ndata: three\n\n") == [Event("one\ntwo"), Event("three")]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_works(ending: bytes) -> None:
    stream = ending.join([b"event: add", b"data: 1", b"", b"data: 2", b"", b""])
    assert parse(stream) == [Event("1", event="add"), Event("2")]


def test_one_leading_space_after_the_colon_is_removed() -> None:
    assert parse(b"data:x\n\ndata: x\n\ndata:  x\n\n") == [Event("x"), Event("x"), Event(" x")]


def test_comments_unknown_fields_and_empty_events_are_ignored() -> None:
    stream = b": keep-alive\nfoo: bar\n\n:another\n\ndata: real\n\n"
    assert parse(stream) == [Event("real")]


def test_an_empty_data_line_is_still_an_event() -> None:
    assert parse(b"data\n\ndata:\n\n") == [Event(""), Event("")]


def test_event_type_resets_but_the_last_id_and_retry_stay() -> None:
    stream = b"event: a\nid: 7\nretry: 1500\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\n"
    assert parse(stream) == [
        Event("1", event="a", id="7", retry=1500),
        Event("2", id="7", retry=1500),
        Event("3", id="", retry=1500),
    ]


def test_an_id_with_nul_and_a_retry_that_is_not_digits_are_ignored() -> None:
    stream = b"id: 1\ndata: a\n\nid: 2\x003\nretry: 5s\nretry: 99999999999999999999\ndata: b\n\n"
    assert parse(stream) == [Event("a", id="1"), Event("b", id="1")]


def test_a_leading_byte_order_mark_is_dropped_even_when_split() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    assert parse_split(stream, [1, 2]) == [Event("x")]
    assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []  # only one: the second makes a field name


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [Event("a")]


def test_invalid_utf8_is_replaced() -> None:
    assert parse(b"data: \xff\xfe\n\n") == [Event("\ufffd\ufffd")]


def test_at_the_end_a_complete_but_undispatched_event_counts() -> None:
    assert parse(b"data: 1\n\ndata: [DONE]\n") == [Event("1"), Event(sse.DONE)]


def test_at_the_end_an_unterminated_line_is_dropped() -> None:
    assert parse(b"data: 1\n\ndata: [DO") == [Event("1")]


def test_a_long_line_is_an_error_not_a_growing_buffer() -> None:
    parser = SSEParser(max_event_bytes=10)
    parser.feed(b"data: 1234")
    with pytest.raises(SSEError, match="longer than 10 bytes"):
        parser.feed(b"5")


def test_a_long_complete_line_is_an_error() -> None:
    with pytest.raises(SSEError, match="longer than 10 bytes"):
        parse(b"data: 123456789\n\n", max_event_bytes=10)


def test_an_event_with_too_much_data_is_an_error() -> None:
    with pytest.raises(SSEError, match="more than 10 bytes"):
        parse(b"data: 1234\ndata: 5678\ndata: 9\n\n", max_event_bytes=10)


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_event_bytes"):
        SSEParser(max_event_bytes=0)


# ---------------------------------------------------------------------------------------- properties

LINE_PIECES = [b"data:", b"data: ", b"event: e", b"id: 1", b"retry: 20", b":", b"x", b"\xef\xbb\xbf", b"\xc3"]
SSE_LIKE = st.lists(
    st.one_of(st.sampled_from([*LINE_PIECES, b"\n", b"\r", b"\r\n", b"\n\n"]), st.binary(max_size=8)), max_size=40
).map(b"".join)


def outcome(run: object) -> list[Event] | str:
    assert callable(run)
    try:
        return list(run())
    except SSEError:
        return "error"


@settings(max_examples=300)
@given(
    data=SSE_LIKE, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12), limit=st.integers(4, 64)
)
def test_any_split_gives_the_same_events_as_the_whole(data: bytes, cuts: list[int], limit: int) -> None:
    cuts = [min(cut, len(data)) for cut in cuts]
    whole = outcome(lambda: parse(data, max_event_bytes=limit))
    assert outcome(lambda: parse_split(data, cuts, max_event_bytes=limit)) == whole
    assert outcome(lambda: parse_split(data, list(range(len(data))), max_event_bytes=limit)) == whole


@settings(max_examples=300)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_arbitrary_bytes_give_events_or_the_documented_error(data: bytes, cuts: list[int]) -> None:
    cuts = [min(cut, len(data)) for cut in cuts]
    result = outcome(lambda: parse_split(data, cuts, max_event_bytes=50))
    assert result == "error" or all(isinstance(event, Event) and isinstance(event.data, str) for event in result)


@given(
    st.lists(
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20),
        min_size=1,
        max_size=5,
    )
)
def test_data_round_trips(lines: list[str]) -> None:
    stream = "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    assert parse(stream) == [Event("\n".join(lines))]
