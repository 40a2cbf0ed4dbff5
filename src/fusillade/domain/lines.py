"""Rendering of the JSONL lines fusillade serves: input files, and the output and error files of a batch.

Output line (completed request):
    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200, "request_id": null,
     "body": {…}}, "error": null}
Error line, upstream HTTP error (the request got a response):
    same shape, with the upstream's status and body.
Error line, no response (expired, cancelled, timeout, connection error, …):
    {"id": "batch_req_…", "custom_id": "…", "response": null, "error": {"code": "batch_expired",
     "message": "…"}}
"""

from __future__ import annotations

import orjson

from fusillade.domain import ids, models, states

BATCH_EXPIRED = "batch_expired"
BATCH_CANCELLED = "batch_cancelled"
BUDGET_EXCEEDED = "budget_exceeded"

ERROR_MESSAGES = {
    BATCH_EXPIRED: "This request could not be executed before the completion window expired.",
    BATCH_CANCELLED: "This request was not executed because its batch was cancelled.",
    BUDGET_EXCEEDED: "This request was not executed because its batch had spent its budget.",
}


def default_message(code: str) -> str:
    return ERROR_MESSAGES.get(code, code)


def input_line(template: models.RequestTemplate) -> bytes:
    """An input line as stored: `{"custom_id","method","url","body"}` (body re-emitted as stored JSON)."""
    head = orjson.dumps({"custom_id": template.custom_id, "method": template.method, "url": template.url})
    return head[:-1] + b',"body":' + template.body.encode() + b"}\n"


_ID_PART = len(b'{"id":"batch_req_') + 32 + len(b'","custom_id":')
_RESPONSE_PART = (
    len(b',"response":{"status_code":') + len(b',"request_id":null,"body":') + len(b'},"error":null}\n')
)
_ERROR_PART = len(b',"response":null,"error":') + len(b"}\n")


def custom_id_json_bytes(custom_id: str) -> int:
    """Size of the JSON-encoded custom_id inside a result line (stored per request at upload, so that the
    backends can keep exact output/error file sizes with plain SQL arithmetic)."""
    return len(orjson.dumps(custom_id))


def response_line_bytes(custom_id_bytes: int, status_code: int, body_bytes: int) -> int:
    """Exact size of `result_line` for a request with a response (`body_bytes` = UTF-8 size of the body)."""
    return _ID_PART + custom_id_bytes + _RESPONSE_PART + len(str(status_code)) + body_bytes


def utf8_size(text: str) -> int:
    """The UTF-8 size of `text`, without encoding it when it is ASCII (CPython knows that at no cost)."""
    return len(text) if text.isascii() else len(text.encode())


def error_line_bytes(custom_id_bytes: int, code: str, message: str) -> int:
    """Exact size of `result_line` for a request that ended without a response."""
    return _ID_PART + custom_id_bytes + _ERROR_PART + len(error_object(code, message))


def error_object(code: str, message: str) -> bytes:
    return orjson.dumps({"code": code, "message": message})


def result_line(request: models.Request) -> bytes:
    """The output or error line of a terminal request (see the module docstring)."""
    if request.response_status is not None:
        return response_line(request.id.hex, request.custom_id, request.response_status, request.response_body)
    prefix = _line_prefix(request.id.hex, request.custom_id)
    code = request.error_code or (BATCH_CANCELLED if request.state is states.RequestState.CANCELED else "error")
    message = request.error_message or default_message(code)
    return prefix + b',"response":null,"error":' + error_object(code, message) + b"}\n"


def response_line(request_hex: str, custom_id: str, status_code: int, body: str | None) -> bytes:
    """The line of a request that has a response, from its columns (`request_hex`: the request id's 32 hex
    digits): what `result_line` writes, without building the request first (an output file's hot path)."""
    return (
        _line_prefix(request_hex, custom_id)
        + b',"response":{"status_code":'
        + str(status_code).encode()
        + b',"request_id":null,"body":'
        + (body if body is not None else "null").encode()
        + b'},"error":null}\n'
    )


def _line_prefix(request_hex: str, custom_id: str) -> bytes:
    return b'{"id":"' + (ids.REQUEST_PREFIX + request_hex).encode() + b'","custom_id":' + orjson.dumps(custom_id)


CANCELLED_MESSAGE = default_message(BATCH_CANCELLED)
CANCELLED_LINE_BYTES = error_line_bytes(0, BATCH_CANCELLED, CANCELLED_MESSAGE)
"""Size of a `batch_cancelled` error line without its custom_id (backends add the row's `custom_id_bytes`)."""
EXPIRED_MESSAGE = default_message(BATCH_EXPIRED)
EXPIRED_LINE_BYTES = error_line_bytes(0, BATCH_EXPIRED, EXPIRED_MESSAGE)
"""Size of a `batch_expired` error line without its custom_id."""
BUDGET_MESSAGE = default_message(BUDGET_EXCEEDED)
BUDGET_LINE_BYTES = error_line_bytes(0, BUDGET_EXCEEDED, BUDGET_MESSAGE)
"""Size of a `budget_exceeded` error line without its custom_id (backends add the row's `custom_id_bytes`)."""
