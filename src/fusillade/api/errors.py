"""Errors on the wire: every failure is the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`
with the status the SDK maps to its exception classes.

| cause                                         | status | code                            | SDK raises          |
|-----------------------------------------------|--------|---------------------------------|---------------------|
| bad input (`ValidationError`, bad parameters) | 400    | `invalid_file`, `invalid_value` | BadRequestError     |
| missing, deleted or another owner's object    | 404    | `not_found`                     | NotFoundError       |
| action not allowed in the object's state      | 400    | `invalid_state`                 | BadRequestError     |
| missing or unknown API key                    | 401    | `invalid_api_key`               | AuthenticationError |
| a JSON body over `MAX_BODY_BYTES` (1 MiB)     | 413    | `request_too_large`             | APIStatusError      |
| database unreachable or too slow              | 503    | `storage_unavailable`           | (retries first)     |
| other database error                          | 500    | `storage_error`                 | (retries first)     |
| anything else                                 | 500    | `internal_error`                | InternalServerError |

A rejected upload also carries its bad lines, both in the message (one per line) and structured, as
`error.lines = [{"line": 3, "message": "..."}]` (line 0 = the whole file). Every 4xx, and every 500 that a retry
cannot fix, has `x-should-retry: false` (the SDK honours it); a 503 has `Retry-After`. A request body that cannot
be read as JSON (not UTF-8, nested too deeply, a number too long) is a 400 `invalid_value` like any bad value.

Nothing a client sent reaches the log: not bodies, keys, metadata or file names, and not the messages of
exceptions, which may quote them (a driver's error quotes the value it refused). A failure is logged with the
route's path template, the exception's class and the stack of code it went through (`redacted_traceback`), and
any exception that no handler takes is answered 500 here rather than left to the server (which would log its
message).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fusillade import errors

logger = logging.getLogger("fusillade.api")

INVALID_REQUEST: Final = "invalid_request_error"
SERVER_ERROR: Final = "server_error"
NO_RETRY: Final = {"x-should-retry": "false"}
RETRY_AFTER_SECONDS: Final = 1
"""What a 503 asks the client to wait (the SDK honours `Retry-After` up to 120 s)."""
_HTTP_METHODS: Final = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
MAX_BODY_BYTES: Final = 1024 * 1024
"""A request body at most, uploads apart (they have their own limit): a batch create's largest useful body, 16
metadata pairs written with `\\u` escapes, is about 60 KB. A larger one is a 413, refused from its
`Content-Length` before it is read, or once that much has come."""
UPLOAD_PATH: Final = "/v1/files"


class ApiError(Exception):
    """An error the API answers with directly (bad parameters, authentication)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str = INVALID_REQUEST,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        if headers is None:
            headers = NO_RETRY if status < 500 else {}
        self.headers = dict(headers)


def error_response(
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    type: str = INVALID_REQUEST,
    headers: Mapping[str, str] | None = None,
    lines: Sequence[errors.LineError] = (),
) -> JSONResponse:
    body: dict[str, Any] = {"message": _text(message), "type": type, "param": _text(param), "code": code}
    if lines:
        body["lines"] = [{"line": line.line, "message": _text(line.reason)} for line in lines]
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


def _text(value: str | None) -> str | None:
    """`value` writable as UTF-8: a lone surrogate a client sent (a JSON `\\ud800` escape) and that a message
    quotes is written as that escape."""
    if value is None:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


def redacted_traceback(exc: BaseException) -> str:
    """The traceback of `exc` (and of its causes) without the exceptions' messages: classes and code only."""
    parts: list[str] = []
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        stack = "".join(traceback.StackSummary.extract(traceback.walk_tb(current.__traceback__)).format())
        kind = type(current)
        parts.append(f"Traceback (most recent call last):\n{stack}{kind.__module__}.{kind.__qualname__}\n")
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return "\nThe above was raised while handling or caused by:\n\n".join(reversed(parts))


def _log_failure(level: int, request: Request, what: str, exc: BaseException) -> None:
    logger.log(level, "%s %s: %s.\n%s", request.method, _route_of(request.scope), what, redacted_traceback(exc))


def _route_of(scope: Scope) -> str:
    """The path template of the route that took the request (`/v1/batches/{batch_id}`), never the path a client
    wrote."""
    route = scope.get("route")
    return str(getattr(route, "path", "(no route)"))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn exceptions into envelopes (most specific class wins)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(errors.ValidationError, _validation_error)
    app.add_exception_handler(errors.NotFound, _not_found)
    app.add_exception_handler(errors.StateConflict, _state_conflict)
    app.add_exception_handler(errors.StorageUnavailable, _storage_unavailable)
    app.add_exception_handler(errors.StorageError, _storage_error)
    app.add_exception_handler(errors.FusilladeError, _internal_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(_BodyLimit)
    app.add_middleware(_LastResort)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status, exc.message, code=exc.code, param=exc.param, type=exc.type, headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ValidationError)
    param = getattr(exc, "param", None)
    # Whole-file problems alone (line 0: too large, no request) are said by the message itself.
    shown = exc.errors if any(line.line for line in exc.errors) else []
    listed = "".join(f"\nline {line.line}: {line.reason}" if line.line else f"\n{line.reason}" for line in shown)
    return error_response(
        400,
        exc.message + listed,
        code="invalid_file" if param == "file" else "invalid_value",
        param=param,
        headers=NO_RETRY,
        lines=exc.errors,
    )


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.NotFound)
    return error_response(404, exc.message, code="not_found", headers=NO_RETRY)


async def _state_conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.StateConflict)
    return error_response(400, exc.message, code="invalid_state", headers=NO_RETRY)


async def _storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning(
        "%s %s: the database is unavailable (%s).", request.method, _route_of(request.scope), type(exc).__name__
    )
    return error_response(
        503,
        "The database is unavailable; try again shortly.",
        code="storage_unavailable",
        type=SERVER_ERROR,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _storage_error(request: Request, exc: Exception) -> JSONResponse:
    _log_failure(logging.ERROR, request, "database error", exc)
    return error_response(500, "The database reported an error.", code="storage_error", type=SERVER_ERROR)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    _log_failure(logging.ERROR, request, "internal error", exc)
    return _internal_error_response()


def _internal_error_response() -> JSONResponse:
    return error_response(
        500, "The server failed to handle the request.", code="internal_error", type=SERVER_ERROR, headers=NO_RETRY
    )


class _LastResort:
    """Answers 500 `internal_error` for an exception no handler took, logging it redacted (Starlette would log it
    whole, message included, after its own 500). An exception after the answer began is logged the same way and
    the answer is left unfinished (the server then closes the connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            request = Request(scope, receive)
            what = "internal error after the answer began" if started else "internal error"
            _log_failure(logging.ERROR, request, what, exc)
            if not started:
                await _internal_error_response()(scope, receive, send)


async def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    if any(problem.get("type") == "json_invalid" for problem in problems):
        return error_response(
            400, "The request body is not valid JSON.", code="invalid_value", param=None, headers=NO_RETRY
        )
    location = [str(part) for part in problems[0].get("loc", ())] if problems else []
    param = None
    if location and location[0] in ("query", "body", "header", "path"):
        param = ".".join(location[1:]) or None
    messages = "; ".join(
        f"{'.'.join(str(part) for part in problem.get('loc', ()))}: {problem.get('msg', 'invalid')}"
        for problem in problems
    )
    return error_response(
        400, f"Invalid request: {messages}.", code="invalid_value", param=param, headers=NO_RETRY
    )


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, _BodyTooLarge):
        return _too_large()
    if exc.status_code == 400:  # FastAPI's answer to a JSON body it could not read
        return error_response(400, _unreadable_body(exc), code="invalid_value", headers=NO_RETRY)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        exc.status_code, "http_error"
    )
    message = (
        f"Unknown endpoint: {request.method} {request.url.path}."
        if exc.status_code in (404, 405)
        else str(exc.detail)
    )
    headers = dict(exc.headers or {})
    allowed = _allowed_methods(request) if exc.status_code == 405 else ""
    if allowed:
        headers["Allow"] = allowed
    if exc.status_code < 500:
        headers.update(NO_RETRY)
    return error_response(exc.status_code, message, code=code, headers=headers)


class _BodyTooLarge(Exception):
    """A request body passed `MAX_BODY_BYTES` while it was read."""


def _too_large() -> JSONResponse:
    return error_response(
        413,
        f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB, the limit.",
        code="request_too_large",
        headers=NO_RETRY,
    )


class _BodyLimit:
    """Holds request bodies (uploads apart) to `MAX_BODY_BYTES`: a larger `Content-Length` is answered 413 at
    once; a body without one is cut off when it passes the limit (the read fails, and the answer is that 413)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"] == UPLOAD_PATH):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > MAX_BODY_BYTES:
            await _too_large()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _unreadable_body(exc: StarletteHTTPException) -> str:
    cause = exc.__cause__
    if isinstance(cause, UnicodeError):
        why = "it is not UTF-8 text"
    elif isinstance(cause, RecursionError):
        why = "it is nested too deeply"
    elif isinstance(cause, ValueError):
        why = "it holds a value JSON readers cannot take, such as a number with thousands of digits"
    else:
        why = "it is not JSON"
    return f"The request body could not be read: {why}."


def _allowed_methods(request: Request) -> str:
    """Every method the path serves, for `Allow` (Starlette's 405 names only those of the first route that
    matched the path, e.g. `POST` alone for `/v1/files`)."""
    routes = request.app.routes
    return ", ".join(
        method
        for method in _HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


async def _client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    """The client went away mid-request: nobody reads this answer."""
    return error_response(400, "The client disconnected.", code="client_disconnected", headers=NO_RETRY)
