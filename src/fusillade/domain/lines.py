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

ERROR_MESSAGES = {
    BATCH_EXPIRED: "This request could not be executed before the completion window expired.",
    BATCH_CANCELLED: "This request was not executed because its batch was cancelled.",
}


def default_message(code: str) -> str:
    return ERROR_MESSAGES.get(code, code)


def input_line(template: models.RequestTemplate) -> bytes:
    """An input line as stored: `{"custom_id","method","url","body"}` (body re-emitted as stored JSON)."""
    head = orjson.dumps({"custom_id": template.custom_id, "method": template.method, "url": template.url})
    return head[:-1] + b',"body":' + template.body.encode() + b"}\n"


def result_line(request: models.Request) -> bytes:
    """The output or error line of a terminal request (see the module docstring)."""
    prefix = (
        b'{"id":"' + ids.request_wire(request.id).encode() + b'","custom_id":' + orjson.dumps(request.custom_id)
    )
    if request.response_status is not None:
        body = (request.response_body if request.response_body is not None else "null").encode()
        return (
            prefix
            + b',"response":{"status_code":'
            + str(request.response_status).encode()
            + b',"request_id":null,"body":'
            + body
            + b'},"error":null}\n'
        )
    code = request.error_code or (BATCH_CANCELLED if request.state is states.RequestState.CANCELED else "error")
    message = request.error_message or default_message(code)
    return prefix + b',"response":null,"error":' + orjson.dumps({"code": code, "message": message}) + b"}\n"
