"""The bodies the mock upstream answers with, in the shapes of the OpenAI API.

Every answer is derived from the request alone (plus the `created` time), so a test can predict it: the reply
text is `reply_text(prompt)`, where the prompt is the last user message (chat, responses), the prompt
(completions; the last one of a list) or each input (embeddings). Token counts are rough and deterministic:
a quarter of the prompt's characters in, one token per word of the reply out.

Streams are lists of encoded SSE events, so the server can inject faults between any two of them.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any, Literal

import orjson

Endpoint = Literal["chat", "completions", "embeddings", "responses"]

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}

DONE = b"data: [DONE]\n\n"
SYSTEM_FINGERPRINT = "fp_mock"
MAX_EMBEDDING_DIMENSIONS = 4096

_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", "timeout"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


def reply_text(prompt: str) -> str:
    """The assistant's reply to `prompt`: its length and a digest of it, so a test can check which request a
    stored answer belongs to."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    return f"Mock reply to {len(prompt)} characters ({digest})."


def prompt_of(endpoint: Endpoint, body: dict[str, Any]) -> str:
    """The text a reply is derived from (see the module docstring); "" when the request has none."""
    if endpoint == "chat":
        return _last_user_text(body.get("messages"))
    if endpoint == "responses":
        value = body.get("input")
        return value if isinstance(value, str) else _last_user_text(value)
    if endpoint == "completions":
        value = body.get("prompt")
        if isinstance(value, list) and value:
            value = value[-1]
        return value if isinstance(value, str) else ""
    return "\n".join(embedding_inputs(body.get("input")))


def error_envelope(status: int, message: str) -> bytes:
    """An OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    kind, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def embedded_error(status: int, message: str) -> bytes:
    """An error inside a 200 answer, as providers send it; `code` is the status, as fusillade reads it."""
    return orjson.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": status}})


def embedded_error_event(status: int, message: str) -> bytes:
    """`embedded_error` as an SSE event."""
    return b"data: " + embedded_error(status, message) + b"\n\n"


def json_body(endpoint: Endpoint, body: dict[str, Any], model: str, created: int, *, dimensions: int) -> bytes:
    """The non-streaming answer; `dimensions` is the embedding length when the request does not set one."""
    if endpoint == "embeddings":
        return _embeddings(body, model, dimensions)
    prompt = prompt_of(endpoint, body)
    text = reply_text(prompt)
    usage = _usage(prompt, text)
    if endpoint == "chat":
        return orjson.dumps(_chat_completion(_identifier("chatcmpl-", prompt), model, created, text, usage))
    if endpoint == "completions":
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        completion = _completion_chunk(_identifier("cmpl-", prompt), model, created, choice)
        return orjson.dumps(completion | {"usage": usage})
    return orjson.dumps(_response_object(prompt, model, created, text, completed=True))


def stream_events(endpoint: Endpoint, body: dict[str, Any], model: str, created: int) -> list[bytes]:
    """The SSE events of a streamed answer, end marker included. Chat and completions send the usage chunk
    only when `stream_options.include_usage` is true, like OpenAI; the Responses API always reports usage in
    `response.completed`."""
    prompt = prompt_of(endpoint, body)
    text = reply_text(prompt)
    words = text.split(" ")
    deltas = [word + " " for word in words[:-1]] + [words[-1]]
    if endpoint == "responses":
        return _response_events(prompt, model, created, text, deltas)
    options = body.get("stream_options")
    usage = _usage(prompt, text) if isinstance(options, dict) and options.get("include_usage") is True else None
    if endpoint == "chat":
        return _chat_events(_identifier("chatcmpl-", prompt), model, created, deltas, usage)
    return _completion_events(_identifier("cmpl-", prompt), model, created, deltas, usage)


def embedding_inputs(value: object) -> list[str]:
    """The inputs of an embeddings request as texts (token arrays as their JSON text)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return [""]
    if all(isinstance(item, int) for item in value):
        return [orjson.dumps(value).decode()]
    return [item if isinstance(item, str) else orjson.dumps(item).decode() for item in value]


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic vector in [-1, 1] per input text."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[index % len(digest)] - 127.5) / 127.5 for index in range(dimensions)]


# ----------------------------------------------------------------------------------------- internals


def _last_user_text(messages: object) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return "".join(text for text in texts if isinstance(text, str))
    return ""


def _identifier(prefix: str, prompt: str) -> str:
    return prefix + hashlib.blake2b(prompt.encode(), digest_size=12).hexdigest()


def _usage(prompt: str, text: str) -> dict[str, int]:
    prompt_tokens = (len(prompt) + 3) // 4
    completion_tokens = text.count(" ") + 1
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chat_completion(
    identifier: str, model: str, created: int, text: str, usage: dict[str, int]
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    return {
        "id": identifier,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }


def _chat_events(
    identifier: str, model: str, created: int, deltas: list[str], usage: dict[str, int] | None
) -> list[bytes]:
    head = {
        "id": identifier,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if usage is not None:
        head["usage"] = None

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse(head | {"choices": [choice]})

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": delta}) for delta in deltas]
    events.append(chunk({}, "stop"))
    if usage is not None:
        events.append(_sse(head | {"choices": [], "usage": usage}))
    events.append(DONE)
    return events


def _completion_chunk(identifier: str, model: str, created: int, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": identifier,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [choice],
    }


def _completion_events(
    identifier: str, model: str, created: int, deltas: list[str], usage: dict[str, int] | None
) -> list[bytes]:
    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return _completion_chunk(identifier, model, created, choice)

    events = [_sse(chunk(delta)) for delta in deltas]
    events.append(_sse(chunk("", "stop")))
    if usage is not None:
        events.append(_sse(chunk("", None) | {"choices": [], "usage": usage}))
    events.append(DONE)
    return events


def _embeddings(body: dict[str, Any], model: str, default_dimensions: int) -> bytes:
    requested = body.get("dimensions")
    dimensions = requested if isinstance(requested, int) and 0 < requested <= MAX_EMBEDDING_DIMENSIONS else None
    dimensions = dimensions or default_dimensions
    as_base64 = body.get("encoding_format") == "base64"
    inputs = embedding_inputs(body.get("input"))
    data = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text, dimensions)
        embedding: object = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt_tokens = sum((len(text) + 3) // 4 for text in inputs)
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})


def _output_message(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    status = "in_progress" if text is None else "completed"
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _response_object(prompt: str, model: str, created: int, text: str, *, completed: bool) -> dict[str, Any]:
    usage = _usage(prompt, text)
    return {
        "id": _identifier("resp_", prompt),
        "object": "response",
        "created_at": created,
        "status": "completed" if completed else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": [_output_message(_identifier("msg_", prompt), text)] if completed else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        }
        if completed
        else None,
        "metadata": {},
    }


def _response_events(prompt: str, model: str, created: int, text: str, deltas: list[str]) -> list[bytes]:
    """The typed events of a streamed Responses API answer, as OpenAI sends them (there is no [DONE])."""
    item_id = _identifier("msg_", prompt)
    in_progress = _response_object(prompt, model, created, text, completed=False)
    part = {"type": "output_text", "text": text, "annotations": []}
    location = {"item_id": item_id, "output_index": 0, "content_index": 0}
    payloads: list[dict[str, Any]] = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        {"type": "response.output_item.added", "output_index": 0, "item": _output_message(item_id, None)},
        {"type": "response.content_part.added", **location, "part": part | {"text": ""}},
        *({"type": "response.output_text.delta", **location, "delta": delta} for delta in deltas),
        {"type": "response.output_text.done", **location, "text": text},
        {"type": "response.content_part.done", **location, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": _output_message(item_id, text)},
        {"type": "response.completed", "response": _response_object(prompt, model, created, text, completed=True)},
    ]
    return [
        b"event: " + payload["type"].encode() + b"\n" + _sse(payload | {"sequence_number": number})
        for number, payload in enumerate(payloads)
    ]
