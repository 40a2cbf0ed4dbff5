"""Streaming validation of an uploaded OpenAI Batch input file (JSONL).

Each line must be one JSON object:

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", ...}}

`validate` reads the file chunk by chunk and yields a `TemplateInput` for every good line once the chunk that
ends it is read, so memory stays flat whatever the file size: only the unfinished last line of a chunk (at most
`Limits.max_line_bytes`: a longer line is dropped as it streams by, and reported), the lines of a chunk, and the
custom_ids seen so far (`seen_ids.SeenIds`: a dict by default; the service's keeps them on disk past 50,000) are
kept. When the stream ends, if any line was bad, it raises `errors.ValidationError` listing the bad lines by
number; a consumer stores the yielded templates inside a transaction, so that raise rolls the whole upload back.
Going over the line count or byte limit raises at once, without reading the rest of the file.

A template's `body` is the line's `body` exactly as written (its bytes, validated as JSON, never re-serialised),
so that the upstream gets what the user wrote: numbers beyond 64 bits, escapes and key order unchanged.

Blank lines are accepted only at the end of the file (editors often add one); unknown top-level keys are
ignored, as OpenAI does; a UTF-8 byte order mark at the start of the file is skipped (Windows editors write
one).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from fusillade import errors
from fusillade.domain import json_spans, models, served
from fusillade.domain.jsonl_lines import TOO_LONG, size_text, split_lines
from fusillade.domain.seen_ids import IdsInMemory, SeenIds
from fusillade.domain.served import ServedModels

SUPPORTED_URLS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"}
)

_BYTE_ORDER_MARK = b"\xef\xbb\xbf"
_JSON_WHITESPACE = b" \t\r"
_MISSING: Any = object()
_SHOWN_CHARACTERS = 60
"""Values quoted back in messages are cut to this many characters."""
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
"""Not allowed in a custom_id or a model name: a newline or NUL there breaks logs, headers and PostgreSQL text."""
MAX_MODEL_LENGTH = served.MAX_SEEN_LENGTH
"""Characters of a model name (the names the server records for the default route are as long at most)."""
MAX_BODY_DEPTH = 254
"""Levels of objects and arrays in a body, the body itself counted (what JSON writers such as orjson write)."""
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_BODY_LAST = re.compile(
    rb"[ \t\r]*+\{((?:[ \t\r]*+"
    + _STRING
    + rb"[ \t\r]*+:[ \t\r]*+(?:"
    + _STRING
    + rb"|[-+.0-9A-Za-z]++)[ \t\r]*+,)*?)"
    rb'[ \t\r]*+"body"[ \t\r]*+:[ \t\r]*+',
    re.DOTALL,
)
"""The usual line up to its body's value: members whose values are strings or scalars, then `"body":`. When the
body is also the last member, the line is read as two small JSON documents, without locating the body's end."""


_CLOSE_BRACE = ord("}")

SETTLE_LINES = 16_384
SETTLE_BYTES = 4 * 1024 * 1024
"""When a look-up of custom_ids is costly (`SeenIds.batched`: in a database), lines wait to be looked up until
there are this many, or until they hold this many bytes (one look-up costs less per line the more lines it
has); their templates are yielded after."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What an input file may hold."""

    max_lines: int = 50_000
    """Request lines (blank lines are not counted)."""
    max_bytes: int = 200 * 1024 * 1024
    max_line_bytes: int = 10 * 1024 * 1024
    """Bytes of one line, its line end excluded: a longer line is refused, and never held whole in memory."""
    max_custom_id_length: int = 512
    """In characters."""
    max_errors: int = 100
    """Bad lines listed in the error; the others are only counted."""
    allowed_urls: frozenset[str] = SUPPORTED_URLS

    def __post_init__(self) -> None:
        for name in ("max_lines", "max_bytes", "max_line_bytes", "max_custom_id_length", "max_errors"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1, not {getattr(self, name)}.")
        if not self.allowed_urls:
            raise ValueError("Limits.allowed_urls must name at least one endpoint path.")


DEFAULT_LIMITS = Limits()


async def iterate_chunks(data: bytes, chunk_size: int = 65536) -> AsyncIterator[bytes]:
    """Yield `data` in chunks of `chunk_size` bytes (the last one shorter): an in-memory upload stream."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}.")
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


async def validate(
    chunks: AsyncIterable[bytes],
    limits: Limits = DEFAULT_LIMITS,
    *,
    model_allowed: Callable[[str], bool] | None = None,
    served: ServedModels | None = None,
    seen_ids: Callable[[], SeenIds] = IdsInMemory,
) -> AsyncIterator[models.TemplateInput]:
    """Yield one `TemplateInput` per good line, in file order, as the stream is read (once the chunk that ends
    the line is read; with `batched` `seen_ids`, up to `SETTLE_LINES` lines or `SETTLE_BYTES` later).

    Raises `errors.ValidationError` (with `errors` = the bad lines, at most `limits.max_errors` of them and
    then a line-0 summary) after the last chunk if any line was bad (a line longer than `limits.max_line_bytes`
    is one) or the file holds no request, and at once when the file goes over `limits.max_lines` or
    `limits.max_bytes`. `model_allowed`, if given, says
    whether the server routes a model; a line whose model it refuses is bad. `served`, if given, is the routing
    table in force: it decides in place of a missing `model_allowed`, and the first line with a model it does
    not serve names the served models (`ServedModels.describe`; the next such lines refer to that line).
    `seen_ids` makes the store of the custom_ids seen (one per call; closed at the end).
    """
    if model_allowed is None and served is not None:
        model_allowed = served.accepts
    scan = _Scan(limits, model_allowed, served, seen_ids())
    try:
        async for lines in split_lines(chunks, limits.max_bytes, limits.max_line_bytes):
            for line in lines:
                if isinstance(line, int):
                    scan.skip_blank_lines(line)
                elif line is TOO_LONG:
                    scan.too_long()
                else:
                    assert isinstance(line, bytes)
                    scan.read(line)
                if scan.over_limit:
                    break
            if scan.settle_due:
                for template in scan.settle():
                    yield template
            if scan.over_limit:
                raise scan.too_many_lines()
        for template in scan.settle():
            yield template
        scan.finish()
    finally:
        scan.close()


@dataclass(frozen=True, slots=True)
class _NoRoute:
    """A line whose model no route serves (its message is written in line order: see `_Scan._no_route`)."""

    model: str


@dataclass(frozen=True, slots=True)
class _Taken:
    """A bad line whose custom_id is valid, and so taken (a later line with the same id is a duplicate): its
    `problem`, unless it repeats the id of an earlier line, which is then its reason."""

    line: int
    custom_id: str
    problem: str | _NoRoute


@dataclass(frozen=True, slots=True)
class _Rejected:
    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class _BlankRun:
    """Blank lines `first` to `end` (excluded), followed by a request line."""

    first: int
    end: int


_Read = models.TemplateInput | _Taken | _Rejected | _BlankRun
"""What a line turned out to be, before its custom_id is looked up among those seen (`_Scan.settle`)."""


class _Scan:
    """The state of one validation: line numbers, custom_ids seen, bad lines found so far.

    Each line is checked as it is read, but whether its custom_id was seen on an earlier line is looked up for
    many lines at once (`settle`); until then what was read waits, in order, in `_pending`, and the bad lines
    are counted and listed only when settled, in line order (as they would be one by one)."""

    def __init__(
        self,
        limits: Limits,
        model_allowed: Callable[[str], bool] | None,
        served: ServedModels | None,
        seen: SeenIds,
    ) -> None:
        self.limits = limits
        self.model_allowed = model_allowed
        self.served = served
        self.served_named_on: int | None = None
        """The line whose message names the served models (the first line with a model without a route)."""
        self.line_number = 0
        self.requests = 0
        self.over_limit = False
        """The last line read is a request over `Limits.max_lines`."""
        self.seen = seen
        self.listed: list[errors.LineError] = []
        self.bad_lines = 0
        self.blank_since: int | None = None
        """First line of the run of blank lines just read (an error only if a request line follows)."""
        self._pending: list[_Read] = []
        self._pending_ids: list[tuple[str, int]] = []
        """The custom_ids taken by the lines in `_pending` (good lines and `_Taken`), with their line numbers."""
        self._pending_bytes = 0

    @property
    def settle_due(self) -> bool:
        """Whether `settle` should run now: after every chunk, or when the ids are `batched`, once enough lines
        wait; and at once when the file has too many requests (then raise `too_many_lines`)."""
        return (
            not self.seen.batched
            or self.over_limit
            or len(self._pending) >= SETTLE_LINES
            or self._pending_bytes >= SETTLE_BYTES
        )

    def read(self, line: bytes) -> None:
        """Check the next line (its outcome waits for `settle`)."""
        self.line_number += 1
        if self.line_number == 1 and line.startswith(_BYTE_ORDER_MARK):
            line = line[len(_BYTE_ORDER_MARK) :]
        if not line.strip(_JSON_WHITESPACE):
            if self.blank_since is None:
                self.blank_since = self.line_number
            return
        if not self._count_request():
            return
        self._pending_bytes += len(line)
        outcome = self._check(line)
        if isinstance(outcome, str):
            self._pending.append(_Rejected(self.line_number, outcome))
        else:
            self._pending.append(outcome)
            self._pending_ids.append((outcome.custom_id, self.line_number))

    def too_long(self) -> None:
        """Note a line longer than `Limits.max_line_bytes` (a bad request line; its content was not kept)."""
        self.line_number += 1
        if not self._count_request():
            return
        limit = self.limits.max_line_bytes
        self._pending.append(
            _Rejected(
                self.line_number,
                f"The line is longer than {size_text(limit)}, the limit for one request line; shorten its body "
                "(such as inline images) or ask the operator to raise [uploads] max_line_bytes.",
            )
        )

    def _count_request(self) -> bool:
        """Count a request line; False if it is one too many (`over_limit`: nothing more is read)."""
        if self.blank_since is not None:
            self._pending.append(_BlankRun(self.blank_since, self.line_number))
            self.blank_since = None
        self.requests += 1
        self.over_limit = self.requests > self.limits.max_lines
        return not self.over_limit

    def skip_blank_lines(self, count: int) -> None:
        """Note `count` blank lines (errors only if a request line follows them)."""
        if self.blank_since is None:
            self.blank_since = self.line_number + 1
        self.line_number += count

    def settle(self) -> list[models.TemplateInput]:
        """Look up the custom_ids of the lines read since the last call, count and list the bad lines among
        them in line order, and return the good lines' templates."""
        pending, self._pending = self._pending, []
        taken, self._pending_ids = self._pending_ids, []
        self._pending_bytes = 0
        firsts = iter(self.seen.first_lines(taken) if taken else ())
        good: list[models.TemplateInput] = []
        for read in pending:
            if isinstance(read, models.TemplateInput):
                first = next(firsts)
                if first == read.line_number:
                    good.append(read)
                else:
                    self._reject(read.line_number, self._used_again(read.custom_id, first))
            elif isinstance(read, _Taken):
                first = next(firsts)
                if first != read.line:
                    self._reject(read.line, self._used_again(read.custom_id, first))
                elif isinstance(read.problem, _NoRoute):
                    self._reject(read.line, self._no_route(read.line, read.problem.model))
                else:
                    self._reject(read.line, read.problem)
            elif isinstance(read, _BlankRun):
                self._reject_blank_run(read.first, read.end)
            else:
                self._reject(read.line, read.reason)
        return good

    def finish(self) -> None:
        """Raise unless every line was good and there was at least one (after the last `settle`)."""
        if self.bad_lines:
            found = list(self.listed)
            unlisted = self.bad_lines - len(found)
            if unlisted:
                more = _count(unlisted, "more bad line")
                found.append(errors.LineError(0, f"… and {more} (only the first {len(self.listed)} are listed)."))
            raise errors.ValidationError(
                f"The file has {_count(self.bad_lines, 'invalid line')}; nothing was stored.", errors=found
            )
        if self.requests == 0:
            reason = "The file contains no requests."
            raise errors.ValidationError(reason, errors=[errors.LineError(0, reason)])

    def close(self) -> None:
        self.seen.close()

    def _reject(self, line_number: int, reason: str) -> None:
        self.bad_lines += 1
        if len(self.listed) < self.limits.max_errors:
            self.listed.append(errors.LineError(line_number, reason))

    def _reject_blank_run(self, first: int, end: int) -> None:
        reason = "The line is empty; blank lines are allowed only at the end of the file."
        room = max(0, self.limits.max_errors - len(self.listed))
        self.listed.extend(errors.LineError(number, reason) for number in range(first, min(end, first + room)))
        self.bad_lines += end - first

    def too_many_lines(self) -> errors.ValidationError:
        """The error of a file with more than `max_lines` requests (`over_limit`; after `settle`)."""
        limit = self.limits.max_lines
        reason = f"The file has more than {limit} requests; the limit is {limit}. Split it into smaller files."
        return errors.ValidationError(
            f"The file has more than {limit} requests; the limit is {limit}. Nothing was stored.",
            errors=[*self.listed, errors.LineError(self.line_number, reason)],
        )

    def _check(self, line: bytes) -> models.TemplateInput | _Taken | str:
        """The line's template, or the first reason it is bad (`_Taken` once its custom_id is valid: a
        duplicate id is the first reason then, known at `settle`)."""
        read = _parse(line)
        if isinstance(read, str):
            return read
        parsed, body_start, body_end = read
        custom_id = parsed.get("custom_id", _MISSING)
        problem = _check_custom_id(custom_id, self.limits)
        if problem:
            return problem
        problem = _check_target(parsed, self.limits)
        if problem:
            return _Taken(self.line_number, custom_id, problem)
        body = parsed.get("body", _MISSING)
        if not isinstance(body, dict):
            return _Taken(
                self.line_number,
                custom_id,
                _wrong("body", body, "a JSON object holding the request for the upstream"),
            )
        model = body.get("model", _MISSING)
        problem = _check_model(model)
        if problem:
            return _Taken(self.line_number, custom_id, problem)
        if self.model_allowed is not None and not self.model_allowed(model):
            return _Taken(self.line_number, custom_id, _NoRoute(model))
        brackets = line.count(b"{", body_start, body_end) + line.count(b"[", body_start, body_end)
        if brackets > MAX_BODY_DEPTH and json_spans.value_span(line, body_start)[1] > MAX_BODY_DEPTH:
            reason = f"body is nested too deeply (over {MAX_BODY_DEPTH} levels of objects and arrays)."
            return _Taken(self.line_number, custom_id, reason)
        return models.TemplateInput(
            line_number=self.line_number,
            custom_id=custom_id,
            method="POST",
            url=parsed["url"],
            model=model,
            body=str(memoryview(line)[body_start:body_end], "utf-8"),
        )

    def _no_route(self, line_number: int, model: str) -> str:
        unrouted = f"model {_show(model)} has no route configured on this server"
        if self.served is None:
            return f"{unrouted}; use a model it serves."
        if self.served_named_on is None:
            self.served_named_on = line_number
            return f"{unrouted}; {self.served.describe()}."
        return f"{unrouted}; the served models are named on line {self.served_named_on}."

    def _used_again(self, custom_id: str, first: int) -> str:
        shown = _show(custom_id, self.limits.max_custom_id_length)
        return (
            f"custom_id {shown} is used again (first on line {first}); every custom_id must be unique within the "
            "file."
        )


def _check_custom_id(custom_id: Any, limits: Limits) -> str | None:
    if not isinstance(custom_id, str) or not custom_id:
        return _wrong("custom_id", custom_id, "a non-empty string that is unique within the file")
    limit = limits.max_custom_id_length
    if len(custom_id) > limit:
        return f"custom_id is {len(custom_id)} characters long; the limit is {limit}."
    control = _CONTROL_CHARACTER.search(custom_id)
    if control:
        return (
            f"custom_id contains the control character {control.group()!r} (at character "
            f"{control.start() + 1}); use printable characters only."
        )
    return None


def _check_model(model: Any) -> str | None:
    if not isinstance(model, str) or not model:
        return _wrong("body.model", model, "a non-empty string naming the model")
    if len(model) > MAX_MODEL_LENGTH:
        return f"body.model is {len(model)} characters long; a model name has at most {MAX_MODEL_LENGTH}."
    control = _CONTROL_CHARACTER.search(model)
    if control:
        return f"body.model contains the control character {control.group()!r}; a model name cannot."
    return None


def _parse(line: bytes) -> tuple[dict[str, Any], int, int] | str:
    """The line's JSON object, and where its `body` is written (`line[start:end]`, empty when there is none);
    or why the line is not a JSON object."""
    fast = _parse_body_last(line)
    if fast is not None:
        return fast
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        try:
            line.decode()
        except UnicodeDecodeError as bad:
            return f"The line is not valid UTF-8 (byte {bad.start + 1} cannot be decoded); save the file as UTF-8."
        if "surrogate" in exc.msg:
            return (
                f"The line holds a lone surrogate escape (such as \\ud800 without its pair) at column "
                f"{exc.colno}: it encodes no character; write the character itself, or both halves of its pair."
            )
        return f"The line is not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object."
    if not isinstance(value, dict):
        return (
            f"The line is {_describe(value)}, not a JSON object; each line must be an object with custom_id, "
            "method, url and body."
        )
    found = json_spans.object_at(line)
    body = found.last("body") if found is not None else None
    return (value, body.start, body.end) if body is not None else (value, 0, 0)


def _parse_body_last(line: bytes) -> tuple[dict[str, Any], int, int] | None:
    """The usual line, `{"custom_id": "…", "method": "POST", "url": "…", "body": {…}}` (keys in any order, the
    body last), read as two JSON documents: the members before the body, and the body itself; None for any other
    line (or an invalid one), which the general path reads."""
    head = _BODY_LAST.match(line)
    if head is None:
        return None
    start = head.end()
    close = _end_of_content(line, len(line)) - 1
    if close < start or line[close] != _CLOSE_BRACE:
        return None
    members = head.group(1)
    try:
        value = orjson.loads(b"{" + members[:-1] + b"}") if members else {}
        value["body"] = orjson.loads(line[start:close])  # fails unless the body ends the object
    except orjson.JSONDecodeError:
        return None
    return value, start, _end_of_content(line, close)


def _end_of_content(line: bytes, end: int) -> int:
    """`end` moved back over the JSON whitespace before it."""
    while end > 0 and line[end - 1] in _JSON_WHITESPACE:
        end -= 1
    return end


def _check_target(parsed: dict[str, Any], limits: Limits) -> str | None:
    """Check `method` and `url`: a POST to one of the supported endpoint paths."""
    method = parsed.get("method", _MISSING)
    if method != "POST":
        return _wrong("method", method, '"POST"')
    url = parsed.get("url", _MISSING)
    if not isinstance(url, str):
        return _wrong("url", url, "an endpoint path such as '/v1/chat/completions'")
    if url not in limits.allowed_urls:
        if "://" in url or url.startswith("//"):
            return (
                f"url {_show(url)} names a host; give only the path (such as '/v1/chat/completions'): "
                "the host comes from the server's routing table."
            )
        supported = ", ".join(sorted(limits.allowed_urls))
        return f"url {_show(url)} is not a supported endpoint; use one of {supported}."
    return None


def _wrong(key: str, value: Any, expected: str) -> str:
    """The message for a field that is missing or holds the wrong kind of value."""
    if value is _MISSING:
        return f"{key} is missing; it must be {expected}."
    return f"{key} must be {expected}, not {_describe(value)}."


def _describe(value: Any) -> str:
    """How a JSON value found in a line is named in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, str):
        return f"the string {_show(value)}" if value else "an empty string"
    if isinstance(value, int | float):
        return f"the number {orjson.dumps(value).decode()}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(text: str, limit: int = _SHOWN_CHARACTERS) -> str:
    """Quote a value from the file, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
