"""What an upstream call came to, as an `Outcome`: pure functions of what came back (no I/O).

| what came back | outcome | code |
|---|---|---|
| 2xx, JSON body | Success, the body as sent | |
| 2xx, body not JSON (or empty) | Success, the body as a JSON string (DESIGN: bodies are JSON text) | |
| 2xx, JSON with an error (`error` set, `"object": "error"`) | see `classify_embedded_error` | `upstream_error` |
| 408, 429, 5xx (404 if the route says so) | Retriable, with the `retry-after(-ms)` delay | `http_<status>` |
| any other status (4xx; 1xx/3xx: redirects are not followed) | Permanent | `http_<status>` |
| an error inside a 2xx stream | see `classify_embedded_error` | `upstream_error` |
| a phase timer ran out | Retriable, the message names the phase | `timeout` |
| no connection, or it broke before the response was read | Retriable | `connection_error` |
| a stream cut, garbled or ended before its end marker | Retriable | `stream_error` |
| a body over the size cap | Permanent (the same request would grow it again) | `response_too_large` |
| a request that cannot be sent (bad URL, header or body) | Permanent | `invalid_request` |

The body of an HTTP error is kept (as JSON text, or a JSON string), so the error file can show it.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from fusillade.clock import WallClock
from fusillade.domain import rate_limit, retry
from fusillade.domain.usage import usage_in
from fusillade.upstream import reassemble
from fusillade.upstream.outcome import Outcome, Permanent, Retriable, Success

TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
STREAM_ERROR = "stream_error"
UPSTREAM_ERROR = "upstream_error"
RESPONSE_TOO_LARGE = "response_too_large"
INVALID_REQUEST = "invalid_request"

MAX_MESSAGE_CHARS = 500
"""Upstream error messages are cut to this length in outcome messages (the whole body is kept apart)."""

_RETRIABLE_ERROR_NAMES = (
    "ratelimit",
    "toomanyrequests",
    "overloaded",
    "servererror",
    "internal",
    "unavailable",
    "timeout",
    "timedout",
    "capacity",
)
"""Markers of a transient error in an embedded error's `code` or `type`, compared without case, `_`, `-`, `.`
or spaces: e.g. `server_error`, `rate_limit_exceeded`, `overloaded_error`, `InternalServerError`."""
_NAME_NOISE = str.maketrans("", "", "_-. ")


def classify_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    clock: WallClock,
    retry_404: bool = False,
    rate_limited: bool = False,
    token_limited: bool = False,
) -> Outcome:
    """A complete, non-streamed HTTP response (a stream is reassembled first, then becomes a `Success`). With
    `rate_limited` (the route has a rate limit), a success reads whether the upstream's headers say no request
    is left (`Success.requests_used_up`); with `token_limited` (the route has a token limit), whether they say no
    token is left."""
    if 200 <= status <= 299:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Success(status_code=status, body=_json_string(body), usage=None)
        error = reassemble.embedded_error(document)
        if error is not None:
            return classify_embedded_error(reassemble.EmbeddedError(error, body.decode()), retry_404=retry_404)
        used_up = (
            rate_limit.limits_used_up(headers, requests=rate_limited, tokens=token_limited)
            if rate_limited or token_limited
            else None
        )
        return Success(status_code=status, body=body.decode(), usage=usage_in(document), requests_used_up=used_up)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        text, detail = _json_string(body), ""
    else:
        error = reassemble.embedded_error(document)
        text, detail = body.decode(), _message_suffix(error.get("message")) if error is not None else ""
    message = f"The upstream answered HTTP {status}{detail}."
    if retry.is_retriable_status(status, retry_404=retry_404):
        return Retriable(
            code=f"http_{status}",
            message=message,
            status_code=status,
            body=text,
            retry_after=retry.parse_retry_after(headers, clock.now()),
        )
    return Permanent(code=f"http_{status}", message=message, status_code=status, body=text)


def classify_embedded_error(error: reassemble.EmbeddedError, *, retry_404: bool = False) -> Retriable | Permanent:
    """An error the upstream reported inside a 2xx response or stream.

    Rule: if the error object has an HTTP status (`status`, `status_code` or `code` holding a number in
    400-599, or a string of one), that status decides as it would for an HTTP error (408, 429, 5xx retriable).
    Otherwise its `code` and `type` decide: a name that says rate limit, overload, server or internal error,
    unavailable, timeout or capacity (`server_error`, `rate_limit_exceeded`, `overloaded_error`, ...) is
    Retriable; anything else, an unknown name or no name at all, is Permanent: the upstream answered and
    said no, and retrying the same request is not known to help.
    """
    details = error.error
    status = _status_of(details)
    if status is not None:
        retriable = retry.is_retriable_status(status, retry_404=retry_404)
    else:
        retriable = _transient_name(details.get("code")) or _transient_name(details.get("type"))
    message = "The upstream reported an error inside its response" + _message_suffix(details.get("message")) + "."
    body = _as_json_text(error.raw)
    if retriable:
        return Retriable(code=UPSTREAM_ERROR, message=message, body=body)
    return Permanent(code=UPSTREAM_ERROR, message=message, body=body)


def timeout(phase: str, detail: str) -> Retriable:
    """A phase timer ran out: `phase` is one of connect, first_byte, idle, total."""
    return Retriable(code=TIMEOUT, message=f"{phase} timeout: {detail}.")


def connection_error(exc: BaseException) -> Retriable:
    return Retriable(code=CONNECTION_ERROR, message=f"Connection to the upstream failed: {_describe(exc)}.")


def stream_error(exc: BaseException) -> Retriable:
    return Retriable(code=STREAM_ERROR, message=f"The upstream stream broke: {_describe(exc)}")


def response_too_large(limit: int) -> Permanent:
    return Permanent(code=RESPONSE_TOO_LARGE, message=f"The upstream response is larger than {limit} bytes.")


def invalid_request(detail: str) -> Permanent:
    return Permanent(code=INVALID_REQUEST, message=f"The request cannot be sent: {detail}.")


def _json_string(body: bytes) -> str:
    return orjson.dumps(body.decode("utf-8", "replace")).decode()


def _as_json_text(raw: str) -> str:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return orjson.dumps(raw).decode()
    return raw


def _status_of(details: Mapping[str, object]) -> int | None:
    for key in ("status", "status_code", "code"):
        value = details.get(key)
        if isinstance(value, str) and len(value) == 3 and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    return None


def _transient_name(value: object) -> bool:
    if not isinstance(value, str):
        return False
    name = value.lower().translate(_NAME_NOISE)
    return any(marker in name for marker in _RETRIABLE_ERROR_NAMES)


def _message_suffix(message: object) -> str:
    if not isinstance(message, str) or not message:
        return ""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    return ": " + message


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
