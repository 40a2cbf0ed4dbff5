"""Durations and byte sizes as people write them in a configuration file or an environment variable.

Durations: a bare number of seconds (`30`, `0.5`, or the same as a string), or one or more
`<number><unit>` parts with units `d`, `h`, `m`, `s`, `ms`, `us` (`"250ms"`, `"10m"`, `"1h30m"`).
Sizes: a bare number of bytes, or `<number><unit>` with `B`, `kB`/`MB`/`GB` (powers of 1000) or
`KiB`/`MiB`/`GiB` (powers of 1024); units of sizes are matched in any case.

The parsers raise `ValueError` with a message meant for the person who wrote the value: it quotes the value
and says what would be accepted.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from decimal import Decimal, InvalidOperation

_DURATION_UNITS = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
    "us": timedelta(microseconds=1),
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*")
_BARE_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")
_DURATION_HELP = (
    'write a number of seconds (30, 0.5) or a number with a unit: "250ms", "5s", "10m", "1h", "1d", '
    'or several, as in "1h30m" (units: d, h, m, s, ms, us)'
)
_NONE = "none"

_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_SIZE_HELP = (
    'write a number of bytes or a number with a unit: "512KiB", "200MiB", "1GB" (B, kB, MB, GB, KiB, MiB, GiB)'
)


def parse_duration(value: object) -> timedelta:
    """A non-negative duration from a number of seconds, a duration string, or a `timedelta` (kept as is)."""
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a duration; {_DURATION_HELP}")
    if isinstance(value, int | float):
        return _seconds(Decimal(value) if math.isfinite(value) else None, repr(value))
    if value.strip().startswith("-"):
        raise ValueError(f"must not be negative, not {value!r}")
    bare = _BARE_NUMBER.fullmatch(value)
    if bare:
        return _seconds(Decimal(bare.group(1)), repr(value))
    return _parse_duration_text(value)


def parse_optional_duration(value: object) -> timedelta | None:
    """Like `parse_duration`, and `"none"` (any case) or None for "no limit"."""
    if value is None or (isinstance(value, str) and value.strip().lower() == _NONE):
        return None
    return parse_duration(value)


def format_duration(duration: timedelta) -> str:
    """An exact string `parse_duration` reads back, in whole units from days down: `"0s"`, `"250ms"`, `"1h30m"`,
    `"1s500ms"`."""
    if duration < timedelta(0):
        raise ValueError(f"cannot format a negative duration ({duration})")
    remaining = duration
    parts = []
    for unit, size in _DURATION_UNITS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def format_optional_duration(duration: timedelta | None) -> str:
    """`format_duration`, and `"none"` for None."""
    return _NONE if duration is None else format_duration(duration)


def parse_byte_size(value: object) -> int:
    """A non-negative number of bytes from an integer, a digit string or a size string such as `"200MiB"`."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a size; {_SIZE_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, not {value}")
        return value
    match = _SIZE.fullmatch(value)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in _SIZE_UNITS):
        raise ValueError(f"{value!r} is not a size; {_SIZE_HELP}")
    size = Decimal(match.group(1)) * _SIZE_UNITS[unit or "b"]
    if size != size.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(size)


def format_byte_size(size: int) -> str:
    """`"200MiB"` when a binary unit divides the size exactly, else the number of bytes (`"1500B"`)."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def _parse_duration_text(text: str) -> timedelta:
    total = timedelta(0)
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(f"{text!r} is not a duration; {_DURATION_HELP}")
        number, unit = match.groups()
        if unit not in _DURATION_UNITS:
            raise ValueError(f"{text!r} has an unknown unit {unit!r}; {_DURATION_HELP}")
        try:
            total += _multiply(_DURATION_UNITS[unit], Decimal(number))
        except OverflowError:
            raise ValueError(f"{text!r} is too long a duration") from None
        position = match.end()
    if position == 0:
        raise ValueError(f"{text!r} is not a duration; {_DURATION_HELP}")
    return total


def _seconds(seconds: Decimal | None, shown: str) -> timedelta:
    if seconds is None:
        raise ValueError(f"{shown} is not a duration; {_DURATION_HELP}")
    if seconds < 0:
        raise ValueError(f"must not be negative, not {shown}")
    try:
        return _multiply(timedelta(seconds=1), seconds)
    except OverflowError:
        raise ValueError(f"{shown} is too long a duration") from None


def _multiply(unit: timedelta, count: Decimal) -> timedelta:
    """`unit * count` rounded to the microsecond, computed in decimal so that a long duration written with a
    fraction ("1.1d") keeps every digit."""
    try:
        microseconds = (count * (unit // timedelta(microseconds=1))).to_integral_value()
    except InvalidOperation:
        raise OverflowError from None
    return timedelta(microseconds=int(microseconds))
