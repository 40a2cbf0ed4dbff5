"""Token usage of upstream responses, and what it costs: pure functions, no I/O.

`usage_of(body)` reads the usage of one successful response body, as stored (JSON text; a streamed call is stored
reassembled into the non-streaming shape, with the final chunk's `usage` or `"usage": null`):

| usage member | chat completions, completions | responses | embeddings |
|---|---|---|---|
| input | `prompt_tokens` | `input_tokens` | `prompt_tokens` |
| cached | `prompt_tokens_details.cached_tokens` | `input_tokens_details.cached_tokens` | 0 |
| output | `completion_tokens` | `output_tokens` | 0 (see `total_tokens`) |
| reasoning | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.reasoning_tokens` | 0 |

Rules, so that usage is data and never a guess:
- No usage (missing, `null`, not an object, or a body that is not a JSON object) is `None`: usage unknown.
- Counts must be integers from 0 to `MAX_COUNT`; a boolean, a float (even `3.0`), a string or a negative count
  makes the whole usage unknown, as do parts that contradict each other (more cached than input tokens, more
  reasoning than output tokens). A missing or null details object, or a missing or null count in it, is 0.
- `total_tokens` is not read: when it disagrees with input + output, the parts are trusted (they are what is
  priced, and what OpenAI's batch `usage` sums). The one use of it: a usage without `completion_tokens` is an
  embedding's (output 0) only if its `total_tokens` is absent or equals `prompt_tokens`; otherwise the output
  count is missing, and the usage is unknown.
- A usage carrying both shapes is read as chat completions (`prompt_tokens` first).
- Vendor extensions (DeepSeek's `prompt_cache_hit_tokens`, audio or prediction token details) are not read: such
  cached tokens count as plain input, so a cost is never under-estimated.

`usage_in(document)` does the same on a body already parsed, for a caller that holds the parsed document anyway.

Speed: `usage_of` runs once per successful request, so it avoids parsing the whole body. It finds the last
`"usage"` key, parses only that object, and checks with one regular expression that what follows it closes the
top-level object (only more members of scalar or flat values, then the final `}`). That proves the key is a member
of the top-level object, and the last one of that name, as a full parse would read it. Whenever the shape is not
one it can be sure of (a `"usage"` inside a string or a nested object, escaped keys, a nested value after it),
it parses the whole body with orjson instead. The body must be JSON text, as every stored body is (the upstream
classifier stores a body that is not JSON as a JSON string); on other text the answer means nothing (it is `None`
when the full parse runs).

Cost is exact `Decimal` arithmetic (never rounded): cached input tokens at `Pricing.cached_input`, the other input
tokens at `Pricing.input`, output tokens (reasoning included: reasoning tokens are output tokens, counted once) at
`Pricing.output`, each price in USD per million tokens.
"""

from __future__ import annotations

import decimal
import enum
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, TypeAlias

import orjson

MAX_COUNT: Final = 2**53 - 1
"""The largest token count accepted: far above any real response, and the largest integer every JSON reader
(JavaScript's included) keeps exactly."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts: those of one response, or a sum of them (`+`). `cached_tokens` are part of `input_tokens`,
    `reasoning_tokens` part of `output_tokens`, as in OpenAI's usage."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cached_tokens + other.cached_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )


ZERO: Final = Usage()
"""No tokens: the start of a sum (`sum(usages, ZERO)`)."""


def usage_of(body: str) -> Usage | None:
    """The usage reported in one successful response body (JSON text), or None if it reports none that is
    usable (see the module docstring for the shapes read and the rules)."""
    found = _usage_near_the_end(body)
    if found is not _Unsure.UNSURE:
        return found
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_in(document)


def usage_in(document: object) -> Usage | None:
    """The usage of a parsed response body (`usage_of` without the parsing)."""
    if not isinstance(document, dict):
        return None
    return _read_usage(document.get("usage"))


def openai_usage(usage: Usage) -> dict[str, object]:
    """`usage` in the shape of OpenAI's batch object `usage` member."""
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


# ------------------------------------------------------------------------------------------ reading a usage


_SHAPES: Final = (
    ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"),
    ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"),
)
"""(input, output, input details, output details) member names: chat completions, completions and embeddings;
then the responses API."""


class _Invalid(Exception):
    """A count that is not a usable token count: the usage is unknown."""


def _read_usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    for input_name, output_name, input_details, output_details in _SHAPES:
        if input_name not in usage:
            continue
        try:
            input_tokens = _count(usage[input_name])
            output_tokens = _output_count(usage, input_name, output_name, input_tokens)
            cached_tokens = _detail(usage.get(input_details), "cached_tokens")
            reasoning_tokens = _detail(usage.get(output_details), "reasoning_tokens")
        except _Invalid:
            return None
        if cached_tokens > input_tokens or reasoning_tokens > output_tokens:
            return None
        return Usage(input_tokens, cached_tokens, output_tokens, reasoning_tokens)
    return None


def _output_count(usage: dict[str, object], input_name: str, output_name: str, input_tokens: int) -> int:
    """The output count; 0 for an embedding's usage (no output count, and a total that is only the input)."""
    if output_name in usage:
        return _count(usage[output_name])
    total = usage.get("total_tokens")
    if input_name == "prompt_tokens" and (total is None or (type(total) is int and total == input_tokens)):
        return 0
    raise _Invalid


def _count(value: object) -> int:
    # `type(...) is int` and not isinstance: a JSON `true` must not count as 1 token
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    raise _Invalid


def _detail(details: object, name: str) -> int:
    if details is None:
        return 0
    if not isinstance(details, dict):
        raise _Invalid
    value = details.get(name)
    return 0 if value is None else _count(value)


# ------------------------------------------------------------------------------------- the quick path


class _Unsure(enum.Enum):
    UNSURE = enum.auto()
    """The quick path cannot be certain of this body: parse it all."""


_WHITESPACE: Final = r"[ \t\r\n]*+"
_STRING: Final = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_USAGE_KEY: Final = '"usage"'
_USAGE_VALUE: Final = re.compile(
    rf"{_WHITESPACE}:{_WHITESPACE}(?:(null)|(\{{[^{{}}]*+(?:\{{[^{{}}]*+\}}[^{{}}]*+)*+\}}))"
)
"""The colon after a `"usage"` key, then `null` (group 1) or a candidate object (group 2): from its `{` to the `}`
that balances it, braces inside strings counted too, at most two deep (every usage seen in the wild). The
candidate is the whole usage object exactly when it parses as JSON: a prefix of a JSON value, or a JSON value
with more after it, is not JSON. Anything else goes to the full parse."""
_FLAT_CONTAINER: Final = rf"[\[{{](?:[^\"\[\]{{}}]++|{_STRING})*+[\]}}]"
_END_OF_TOP_LEVEL: Final = re.compile(
    rf"(?:{_WHITESPACE},{_WHITESPACE}\"[^\"\\]*+\"{_WHITESPACE}:{_WHITESPACE}"
    rf"(?:{_STRING}|[-+.0-9A-Za-z]++|{_FLAT_CONTAINER}))*+{_WHITESPACE}\}}{_WHITESPACE}",
    re.DOTALL,
)
"""What may follow the usage value for it to be a member of the top-level object: more members (keys without
escapes, so none is an escaped `usage`; values that are strings, scalars, or containers holding no container),
then the `}` that ends the text, closing the object the usage is in: so that object is the top-level one."""


def _usage_near_the_end(body: str) -> Usage | _Unsure | None:
    """The usage read from the last `"usage"` key alone, when the text around it proves that a full parse would
    read the same (module docstring); `_Unsure.UNSURE` otherwise.

    Why a match is a key: inside a JSON string every quote is escaped, so `"usage"` with no backslash before it
    is a whole string token, and a string followed by a colon is a key. Why it is the key a full parse keeps:
    the text after its value closes the object it is in and ends (so that object is the top-level one), and
    no key after it is `usage` (the match is the last plain one, and the keys after it have no escapes)."""
    key = body.rfind(_USAGE_KEY)
    if key < 0:
        # no key spelled plainly; a key spelled with escapes (`"us\u0061ge"`) needs a `\u`
        return None if "\\u" not in body else _Unsure.UNSURE
    if key > 0 and body[key - 1] == "\\":
        return _Unsure.UNSURE  # an escaped quote: the match is the end of a string or key holding `"usage`
    value = _USAGE_VALUE.match(body, key + len(_USAGE_KEY))
    if value is None or _END_OF_TOP_LEVEL.fullmatch(body, value.end()) is None:
        return _Unsure.UNSURE
    if value.group(1) is not None:
        return None
    try:
        usage = orjson.loads(value.group(2))
    except orjson.JSONDecodeError:
        return _Unsure.UNSURE
    return _read_usage(usage)


# ----------------------------------------------------------------------------------------------- cost

Price: TypeAlias = Decimal | int | str | float
"""A price as configured; a float is taken as the decimal it prints as (`0.15` is 0.15, not 0.1499999...)."""

_EXACT: Final = decimal.Context(
    prec=200, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow, decimal.DivisionByZero]
)
"""Cost arithmetic never rounds: an inexact result would raise rather than pass unnoticed."""
_PER_MILLION: Final = -6


def _price(value: Price) -> Decimal:
    if isinstance(value, bool):
        raise TypeError("A price must be a number, not a boolean.")
    try:
        price = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except decimal.InvalidOperation:
        price = Decimal("NaN")
    if not price.is_finite() or price < 0:
        raise ValueError(f"A price must be a finite number of USD per million tokens, 0 or more; got {value!r}.")
    return price


@dataclass(frozen=True, slots=True)
class Pricing:
    """A model's prices in USD per million tokens. Build it with `Pricing.per_million`, which takes the
    configured values and prices cached input like other input when no `cached_input` is configured."""

    input: Decimal
    cached_input: Decimal
    output: Decimal

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            value = getattr(self, name)
            if not isinstance(value, Decimal):
                raise TypeError(f"Pricing.{name} must be a Decimal; use Pricing.per_million to convert.")
            _price(value)

    @classmethod
    def per_million(cls, *, input: Price, output: Price, cached_input: Price | None = None) -> Pricing:
        """Prices as configured (`[models."NAME".pricing]`), checked: finite and not negative."""
        input_price = _price(input)
        return cls(
            input=input_price,
            cached_input=input_price if cached_input is None else _price(cached_input),
            output=_price(output),
        )


@dataclass(frozen=True, slots=True)
class Cost:
    """What some usage cost, in USD, exactly (`+` adds costs, e.g. of a batch's several models)."""

    input: Decimal
    output: Decimal

    @property
    def total(self) -> Decimal:
        return _EXACT.add(self.input, self.output)

    def __add__(self, other: Cost) -> Cost:
        return Cost(_EXACT.add(self.input, other.input), _EXACT.add(self.output, other.output))


NO_COST: Final = Cost(Decimal(0), Decimal(0))
"""The start of a sum of costs."""


def cost_fields(cost: Cost | None) -> dict[str, object] | None:
    """A cost as fusillade's JSON shows it (the batch's `cost`, `GET /v1/usage`, the CLI's `--json`): US dollars
    as JSON numbers; None stays None (unknown)."""
    if cost is None:
        return None
    return {
        "currency": "usd",
        "input": float(cost.input),
        "output": float(cost.output),
        "total": float(cost.total),
    }


def cost(usage: Usage, pricing: Pricing) -> Cost:
    """The exact cost of `usage` at `pricing`: cached input tokens at `cached_input`, the rest of the input at
    `input`, output tokens (reasoning included, charged once) at `output`."""
    if usage.cached_tokens > usage.input_tokens:
        raise ValueError("A usage cannot have more cached input tokens than input tokens.")
    cached = _charge(usage.cached_tokens, pricing.cached_input)
    uncached = _charge(usage.input_tokens - usage.cached_tokens, pricing.input)
    return Cost(input=_EXACT.add(cached, uncached), output=_charge(usage.output_tokens, pricing.output))


def _charge(tokens: int, price_per_million: Decimal) -> Decimal:
    return _EXACT.multiply(Decimal(tokens), price_per_million).scaleb(_PER_MILLION, _EXACT)
