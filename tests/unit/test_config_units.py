"""Configuration units (`fusillade.config.units`): durations and byte sizes read from numbers and text, the
explanations of bad ones, and the formatted values reading back exactly."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusillade.config import format_duration, parse_duration, units


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, timedelta(seconds=30)),
        (0.5, timedelta(milliseconds=500)),
        ("30", timedelta(seconds=30)),
        (" 0.25 ", timedelta(milliseconds=250)),
        ("250ms", timedelta(milliseconds=250)),
        ("5s", timedelta(seconds=5)),
        ("10m", timedelta(minutes=10)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(minutes=90)),
        ("2 m 3 s", timedelta(minutes=2, seconds=3)),
        ("10us", timedelta(microseconds=10)),
        ("0", timedelta(0)),
        (timedelta(seconds=3), timedelta(seconds=3)),
    ],
)
def test_durations_are_read(value: object, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is not a duration"),
        ("soon", "is not a duration"),
        ("5", None),
        ("5 sec", "unknown unit 'sec'"),
        ("5M", "unknown unit 'M'"),
        ("1h30", "is not a duration"),
        ("-5s", "must not be negative"),
        (-1, "must not be negative"),
        (float("nan"), "is not a duration"),
        (float("inf"), "is not a duration"),
        (True, "must be a duration"),
        (None, "must be a duration"),
        ("99999999999d", "too long"),
        (timedelta(seconds=-1), "must not be negative"),
    ],
)
def test_bad_durations_are_explained(value: object, message: str | None) -> None:
    if message is None:
        assert parse_duration(value) == timedelta(seconds=5)
        return
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_none_means_no_limit_where_allowed() -> None:
    assert units.parse_optional_duration("none") is None
    assert units.parse_optional_duration(" None ") is None
    assert units.parse_optional_duration("2s") == timedelta(seconds=2)
    assert units.format_optional_duration(None) == "none"


@given(st.timedeltas(min_value=timedelta(0)))
def test_formatted_durations_read_back_exactly(duration: timedelta) -> None:
    assert parse_duration(format_duration(duration)) == duration


@given(st.integers(min_value=0, max_value=10**9))
def test_bare_seconds_read_as_seconds(seconds: int) -> None:
    assert parse_duration(seconds) == parse_duration(str(seconds)) == timedelta(seconds=seconds)


def test_durations_format_with_the_largest_units() -> None:
    assert format_duration(timedelta(0)) == "0s"
    assert format_duration(timedelta(milliseconds=250)) == "250ms"
    assert format_duration(timedelta(hours=1, minutes=30)) == "1h30m"
    assert format_duration(timedelta(days=2, microseconds=1)) == "2d1us"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1000, 1000),
        ("1000", 1000),
        ("1kB", 1000),
        ("200MiB", 200 * 1024**2),
        ("1.5 KiB", 1536),
        ("2gb", 2 * 10**9),
    ],
)
def test_sizes_are_read(value: object, expected: int) -> None:
    assert units.parse_byte_size(value) == expected


@pytest.mark.parametrize("value", ["", "MiB", "1.5B", "10 parsecs", -1, 1.5, True])
def test_bad_sizes_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"size|negative|whole number"):
        units.parse_byte_size(value)


@given(st.integers(min_value=1, max_value=2**50))
def test_formatted_sizes_read_back_exactly(size: int) -> None:
    assert units.parse_byte_size(units.format_byte_size(size)) == size
