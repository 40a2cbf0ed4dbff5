"""Errors on the wire: every failure is the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`
with the status the SDK maps to its exception classes.

| cause                                         | status | code                            | SDK raises          |
|-----------------------------------------------|--------|---------------------------------|---------------------|
| bad input (`ValidationError`, bad parameters) | 400    | `invalid_file`, `invalid_value` | BadRequestError     |
| missing, deleted or another owner's object    | 404    | `not_found`                     | NotFoundError       |
| action not allowed in the object's state      | 400    | `invalid_state`                 | BadRequestError     |
| missing or unknown API key                    | 401    | `invalid_api_key`               | AuthenticationError |
| database unreachable or too slow              | 503    | `storage_unavailable`           | (retries first)     |
| other database error                          | 500    | `storage_error`                 | (retries first)     |
| anything else                                 | 500    | `internal_error`                | InternalServerError |

A rejected upload also carries its bad lines, both in the message (one per line) and structured, as
`error.lines = [{"line": 3, "message": "..."}]` (line 0 = the whole file). Every 4xx, and every 500 that a retry
cannot fix, has `x-should-retry: false` (the SDK honours it); a 503 has `Retry-After`. Bodies and keys are never
logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from fusillade import errors

logger = logging.getLogger("fusillade.api")

INVALID_REQUEST: Final = "invalid_request_error"
SERVER_ERROR: Final = "server_error"
NO_RETRY: Final = {"x-should-retry": "false"}
RETRY_AFTER_SECONDS: Final = 1
"""What a 503 asks the client to wait (the SDK honours `Retry-After` up to 120 s)."""
_HTTP_METHODS: Final = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


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
    body: dict[str, Any] = {"message": message, "type": type, "param": param, "code": code}
    if lines:
        body["lines"] = [{"line": line.line, "message": line.reason} for line in lines]
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


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
        "%s %s: the database is unavailable (%s).", request.method, request.url.path, type(exc).__name__
    )
    return error_response(
        503,
        "The database is unavailable; try again shortly.",
        code="storage_unavailable",
        type=SERVER_ERROR,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _storage_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s: database error.", request.method, request.url.path, exc_info=exc)
    return error_response(500, "The database reported an error.", code="storage_error", type=SERVER_ERROR)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s: internal error.", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "The server failed to handle the request.", code="internal_error", type=SERVER_ERROR, headers=NO_RETRY
    )


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
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
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
