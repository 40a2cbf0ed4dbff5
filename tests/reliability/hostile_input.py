"""What the hostile input scenario (`test_hostile_input.py`, `test_hostile_uploads.py`, `test_hostile_upstream.py`)
shares: the hypothesis settings of its properties (`examples`, more under `--long`), the API's small upload limits,
JSON nested deeper than JSON writers go, and hostile JSONL files: good request lines mixed with hostile ones
(invalid JSON, non-UTF-8, non-objects, control characters and NUL in `custom_id` or `model`, a raw newline inside
a `custom_id`, duplicates, bodies nested too deeply, hosts in `url`, blank lines, byte order marks mid-file, lone
surrogates), each file knowing which of its lines are bad."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fusillade.domain import jsonl
from tests.reliability import conftest
from tests.support.api_server import ROUTED_MODELS

CHAT = "/v1/chat/completions"
LIMITS = jsonl.Limits(max_bytes=256 * 1024, max_custom_id_length=64)
"""The API's upload limits in this scenario (small, so that going over them is cheap)."""
LONG_EXAMPLES = 10
"""`pytest --long` runs this many times the examples of each property."""


def examples(count: int) -> settings:
    """Hypothesis settings of a property run over real sockets and databases: `count` examples (more under
    `--long`), no deadline (the machine is shared), no example database (nothing left in the checkout)."""
    return settings(
        max_examples=count * (LONG_EXAMPLES if conftest.LONG else 1),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


names = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=12)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
CONTROL_CHARACTERS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f"]


def request_line(custom_id: str, *, model: str = "model-a", **changes: Any) -> bytes:
    record: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": f"hello {custom_id}"}]},
    }
    return orjson.dumps(record | changes)


def deep(depth: int) -> str:
    """JSON nested `depth` levels deep (as text: orjson refuses to write it, which is the point)."""
    return "[" * depth + "]" * depth


def deep_line(custom_id: str, depth: int) -> bytes:
    """A request line whose body holds an array nested `depth` levels deep."""
    return request_line(custom_id).replace(
        b'"messages":', b'"nested":' + deep(depth).encode() + b',"messages":', 1
    )


@dataclass(frozen=True)
class Piece:
    """Consecutive physical lines of a file (without their line ends), the indexes of those that are bad,
    and the requests the good ones make."""

    lines: tuple[bytes, ...]
    bad: frozenset[int] = frozenset({0})
    requests: int = 0


def good(custom_id: str, model: str = "model-a") -> Piece:
    return Piece((request_line(custom_id, model=model),), frozenset(), 1)


def _garbage(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((b"{" + draw(st.binary(max_size=40)).replace(b"\n", b" "),))


def _not_utf8(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((request_line(fresh).replace(fresh.encode(), fresh.encode() + b"\xff\xfe"),))


def _not_object(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((orjson.dumps(draw(json_values.filter(lambda item: not isinstance(item, dict)))),))


def _control_in_custom_id(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((request_line(fresh + draw(st.sampled_from(CONTROL_CHARACTERS)) + "x"),))


def _control_in_model(fresh: str, draw: st.DrawFn) -> Piece:
    return Piece((request_line(fresh, model="model-a" + draw(st.sampled_from(CONTROL_CHARACTERS))),))


def _raw_newline_in_custom_id(fresh: str, draw: st.DrawFn) -> Piece:
    first, _, second = request_line(f"{fresh}@@split").partition(b"@@")
    return Piece((first, second), frozenset({0, 1}))


def _host_in_url(fresh: str, draw: st.DrawFn) -> Piece:
    url = draw(st.sampled_from(["http://169.254.169.254" + CHAT, "//evil.example" + CHAT, "file:///etc/x"]))
    return Piece((request_line(fresh, url=url),))


def _blank_then_request(fresh: str, draw: st.DrawFn) -> Piece:
    blank = draw(st.sampled_from([b"", b" ", b"\t \t"]))
    return Piece((blank, request_line(f"{fresh}-after-blank")), frozenset({0}), 1)


HOSTILE: dict[str, Callable[[str, st.DrawFn], Piece]] = {
    "garbage": _garbage,
    "not_utf8": _not_utf8,
    "not_object": _not_object,
    "control_in_custom_id": _control_in_custom_id,
    "control_in_model": _control_in_model,
    "raw_newline_in_custom_id": _raw_newline_in_custom_id,
    "deep_body": lambda fresh, draw: Piece((deep_line(fresh, draw(st.integers(254, 1100))),)),
    "host_in_url": _host_in_url,
    "wrong_method": lambda fresh, draw: Piece(
        (request_line(fresh, method=draw(st.sampled_from(["GET", "post", None, 1]))),)
    ),
    "unrouted_model": lambda fresh, draw: Piece((request_line(fresh, model="gpt-unrouted"),)),
    "long_custom_id": lambda fresh, draw: Piece((request_line(fresh + "x" * LIMITS.max_custom_id_length),)),
    "blank_then_request": _blank_then_request,
    # Bad on line 1 too: the mark is skipped there, and `[1]` is no object.
    "byte_order_mark": lambda fresh, draw: Piece((b"\xef\xbb\xbf[1]",)),
    "lone_surrogate": lambda fresh, draw: Piece((request_line("SURROGATE").replace(b"SURROGATE", rb"\ud800"),)),
    "nul_byte": lambda fresh, draw: Piece((request_line(fresh).replace(b'"method"', b'\x00"method"'),)),
}
"""Hostile pieces, each bad wherever it stands; `fresh` is a custom_id of its own (unique in the file)."""
HOSTILE_KINDS = [*HOSTILE, "duplicate_custom_id"]


@dataclass(frozen=True)
class HostileFile:
    data: bytes
    bad_lines: tuple[int, ...]
    """1-based numbers of the lines that must be reported."""
    requests: int
    """Requests stored when the file is good."""
    kinds: tuple[str, ...]


@st.composite
def hostile_files(draw: st.DrawFn, max_hostile: int = 3) -> HostileFile:
    custom_ids = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    pieces = [good("req-" + custom_id, draw(st.sampled_from(sorted(ROUTED_MODELS)))) for custom_id in custom_ids]
    kinds = draw(st.lists(st.sampled_from(HOSTILE_KINDS), max_size=max_hostile))
    for n, kind in enumerate(kinds):
        position = draw(st.integers(0, len(pieces)))
        if kind == "duplicate_custom_id":
            # A copy of a good line placed after it: the copy is the bad one.
            originals = [index for index, piece in enumerate(pieces) if not piece.bad]
            original = draw(st.sampled_from(originals))
            position = draw(st.integers(original + 1, len(pieces)))
            piece = Piece(pieces[original].lines)
        else:
            piece = HOSTILE[kind](f"hostile-{n}", draw)
        pieces.insert(position, piece)
    lines: list[bytes] = []
    bad: list[int] = []
    for piece in pieces:
        bad += [len(lines) + 1 + index for index in sorted(piece.bad)]
        lines += piece.lines
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = ending.join(lines) + (ending if draw(st.booleans()) else b"")
    return HostileFile(data, tuple(bad), sum(piece.requests for piece in pieces), tuple(kinds))
