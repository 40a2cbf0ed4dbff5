"""Fold the SSE events of a streamed response into the body the same call returns without streaming.

One reassembler per endpoint kind, picked by the request path (`reassembler_for(path)()`):

- chat completions (`.../chat/completions`): per choice index, `content` and `refusal` are concatenated, as is
  any other string field of the delta (e.g. `reasoning_content`); `role` and non-string fields take their last
  value; `tool_calls` are assembled by index (id, type and function name take their last non-empty value, the
  arguments are concatenated; a tool call without index takes its position in the delta); `logprobs` lists are
  concatenated; `finish_reason` is the last one sent; `content` and `refusal` stay null when no delta carried
  them (as in a non-streamed tool call answer). `id`, `created`, `model`, `system_fingerprint` and
  `service_tier` take their last value; `usage` comes from the usage chunk. The stream must end with `[DONE]`.
- completions (`.../completions`): `text` and the `logprobs` lists concatenated per choice, the rest as above.
- responses (`.../responses`): the `response` object of the `response.completed` (or `response.incomplete`)
  event is the body; other events are skipped unread when they carry an `event:` name.

The stream is checked as it goes, and the first problem raises:
- `EmbeddedError`: the upstream reported an error inside its 2xx stream: a data object with a non-null
  `error` member or with `"object": "error"`, an `event: error`, or a `response.failed` event.
  `classify.classify_embedded_error` decides whether it is worth a retry.
- `StreamError`: the stream is unusable: data that is not a JSON object, a chunk of the wrong shape, a body
  nested too deeply to be written back as JSON, or an end before `[DONE]` (before `response.completed` for the
  responses API). Such a stream was cut or garbled on the way, so it counts as a broken stream and is retried.
Events after the end (`[DONE]` or the completed response) are ignored.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from fusillade.upstream import sse

Json = dict[str, Any]


class StreamError(Exception):
    """The stream ended early or carried data that is not a well-formed chunk."""


class EmbeddedError(Exception):
    """The upstream reported an error inside a successful (2xx) response."""

    def __init__(self, error: Json, raw: str) -> None:
        super().__init__("The upstream reported an error inside its response.")
        self.error = error
        """The error object (`{"code", "message", "type", ...}` in OpenAI's shape; may be empty)."""
        self.raw = raw
        """The data that carried it, as sent (JSON text, or any text for an `event: error`)."""


class Reassembler(Protocol):
    @property
    def complete(self) -> bool:
        """The end of the stream was seen: later events change nothing."""
        ...

    def add(self, event: sse.Event) -> None:
        """Fold in the next event; raises `EmbeddedError` or `StreamError`."""
        ...

    def finish(self) -> bytes:
        """The reassembled body as JSON; raises `StreamError` if the stream did not end properly."""
        ...


def reassembler_for(path: str) -> Callable[[], Reassembler] | None:
    """What makes a reassembler for a request path; None for a path whose responses are not streamed."""
    path = path.partition("?")[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return ChatCompletionReassembler
    if path.endswith("/completions"):
        return CompletionReassembler
    if path.endswith("/responses"):
        return ResponsesReassembler
    return None


def embedded_error(document: object) -> Json | None:
    """The error object carried by a response document, if it is one (see the module docstring)."""
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if error is None:
        return document if document.get("object") == "error" else None
    if isinstance(error, dict):
        return error
    return {"message": error} if isinstance(error, str) else {}


def _error_event(event: sse.Event) -> EmbeddedError:
    try:
        document = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return EmbeddedError({"message": event.data}, event.data)
    error = embedded_error(document)
    if error is None:
        error = document if isinstance(document, dict) else {}
    return EmbeddedError(error, event.data)


def _parse(event: sse.Event) -> Json:
    try:
        document = orjson.loads(event.data)
    except orjson.JSONDecodeError as exc:
        raise StreamError(f"The stream carried data that is not JSON ({exc}).") from None
    if not isinstance(document, dict):
        raise StreamError("The stream carried JSON data that is not an object.")
    return document


def _dumps(body: Json) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:  # orjson reads JSON nested deeper than it writes
        raise StreamError(f"The stream carried data that cannot be stored as JSON ({exc}).") from None


def _malformed(what: str) -> StreamError:
    return StreamError(f"The stream carried a malformed chunk: {what}.")


def _index(value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _malformed("an index that is not a non-negative integer")


def _merge_logprobs(merged: Json | None, logprobs: object) -> Json | None:
    """Concatenate the lists of successive `logprobs` objects; other members take their last non-null value."""
    if logprobs is None:
        return merged
    if not isinstance(logprobs, dict):
        raise _malformed("logprobs that are not an object")
    if merged is None:
        merged = {}
    for key, value in logprobs.items():
        if isinstance(value, list):
            previous = merged.get(key)
            if isinstance(previous, list):
                previous.extend(value)
            else:
                merged[key] = list(value)
        elif value is not None or key not in merged:
            merged[key] = value
    return merged


_TOP_LEVEL = ("id", "created", "model", "system_fingerprint", "service_tier")


class _ChunkReassembler(abc.ABC):
    """What chat completions and completions share: `[DONE]`, error detection, top-level fields, usage."""

    _object = ""

    def __init__(self) -> None:
        self._done = False
        self._top: Json = {}
        self._usage: object = None

    @property
    def complete(self) -> bool:
        return self._done

    def add(self, event: sse.Event) -> None:
        if self._done:
            return
        if event.data == sse.DONE:
            self._done = True
            return
        if event.event == "error":
            raise _error_event(event)
        chunk = _parse(event)
        error = embedded_error(chunk)
        if error is not None:
            raise EmbeddedError(error, event.data)
        top = self._top
        for key in _TOP_LEVEL:
            value = chunk.get(key)
            if value is not None:
                top[key] = value
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        if choices is None:
            return
        if not isinstance(choices, list):
            raise _malformed("choices that are not a list")
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise _malformed("a choice that is not an object")
            self._add_choice(_index(choice.get("index"), position), choice)

    def finish(self) -> bytes:
        if not self._done:
            raise StreamError("The stream ended before [DONE].")
        top = self._top
        body: Json = {}
        for key in ("id", "created", "model"):
            if key in top:
                body[key] = top[key]
        body["object"] = self._object
        body["choices"] = self._choices()
        body["usage"] = self._usage
        for key in ("system_fingerprint", "service_tier"):
            if key in top:
                body[key] = top[key]
        return _dumps(body)

    @abc.abstractmethod
    def _add_choice(self, index: int, choice: Json) -> None: ...

    @abc.abstractmethod
    def _choices(self) -> list[Json]: ...


class _ToolCall:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: object = None
        self.type: object = None
        self.name: object = None
        self.arguments: list[str] = []

    def add(self, delta: Json) -> None:
        for key in ("id", "type"):
            value = delta.get(key)
            if value:
                setattr(self, key, value)
        function = delta.get("function")
        if function is None:
            return
        if not isinstance(function, dict):
            raise _malformed("a tool call function that is not an object")
        name = function.get("name")
        if name:
            self.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            self.arguments.append(arguments)
        elif arguments is not None:
            raise _malformed("tool call arguments that are not a string")

    def body(self) -> Json:
        return {
            "id": self.id,
            "type": self.type or "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


class _ChatChoice:
    __slots__ = ("finish_reason", "function_call", "logprobs", "role", "strings", "tool_calls", "values")

    def __init__(self) -> None:
        self.role: object = None
        self.strings: dict[str, list[str]] = {}
        """String members of the deltas (content, refusal, reasoning_content, ...), in the order first seen."""
        self.values: Json = {}
        self.tool_calls: dict[int, _ToolCall] = {}
        self.function_call: _ToolCall | None = None
        self.logprobs: Json | None = None
        self.finish_reason: object = None

    def add(self, choice: Json) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._add_delta(delta)
        elif delta is not None:
            raise _malformed("a delta that is not an object")
        self.logprobs = _merge_logprobs(self.logprobs, choice.get("logprobs"))
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None:
            self.finish_reason = finish_reason

    def _add_delta(self, delta: Json) -> None:
        for key, value in delta.items():
            if value is None:
                continue
            if key == "role":
                self.role = value
            elif key == "tool_calls":
                self._add_tool_calls(value)
            elif key == "function_call":
                if not isinstance(value, dict):
                    raise _malformed("a function_call that is not an object")
                if self.function_call is None:
                    self.function_call = _ToolCall()
                self.function_call.add({"function": value})
            elif isinstance(value, str):
                self.strings.setdefault(key, []).append(value)
            else:
                self.values[key] = value

    def _add_tool_calls(self, tool_calls: object) -> None:
        if not isinstance(tool_calls, list):
            raise _malformed("tool_calls that are not a list")
        for position, delta in enumerate(tool_calls):
            if not isinstance(delta, dict):
                raise _malformed("a tool call that is not an object")
            index = _index(delta.get("index"), position)
            call = self.tool_calls.get(index)
            if call is None:
                call = self.tool_calls[index] = _ToolCall()
            call.add(delta)

    def body(self, index: int) -> Json:
        message: Json = {"role": self.role or "assistant", "content": None, "refusal": None}
        for key, parts in self.strings.items():
            message[key] = "".join(parts)
        message.update(self.values)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].body() for i in sorted(self.tool_calls)]
        if self.function_call is not None:
            message["function_call"] = self.function_call.body()["function"]
        return {"index": index, "message": message, "logprobs": self.logprobs, "finish_reason": self.finish_reason}


class ChatCompletionReassembler(_ChunkReassembler):
    _object = "chat.completion"

    def __init__(self) -> None:
        super().__init__()
        self._choices_by_index: dict[int, _ChatChoice] = {}

    def _add_choice(self, index: int, choice: Json) -> None:
        state = self._choices_by_index.get(index)
        if state is None:
            state = self._choices_by_index[index] = _ChatChoice()
        state.add(choice)

    def _choices(self) -> list[Json]:
        return [self._choices_by_index[i].body(i) for i in sorted(self._choices_by_index)]


class _CompletionChoice:
    __slots__ = ("finish_reason", "logprobs", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: Json | None = None
        self.finish_reason: object = None


class CompletionReassembler(_ChunkReassembler):
    _object = "text_completion"

    def __init__(self) -> None:
        super().__init__()
        self._choices_by_index: dict[int, _CompletionChoice] = {}

    def _add_choice(self, index: int, choice: Json) -> None:
        state = self._choices_by_index.get(index)
        if state is None:
            state = self._choices_by_index[index] = _CompletionChoice()
        text = choice.get("text")
        if isinstance(text, str):
            state.text.append(text)
        elif text is not None:
            raise _malformed("a text that is not a string")
        state.logprobs = _merge_logprobs(state.logprobs, choice.get("logprobs"))
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None:
            state.finish_reason = finish_reason

    def _choices(self) -> list[Json]:
        return [
            {
                "text": "".join(state.text),
                "index": index,
                "logprobs": state.logprobs,
                "finish_reason": state.finish_reason,
            }
            for index, state in sorted(self._choices_by_index.items())
        ]


_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete"})


class ResponsesReassembler:
    def __init__(self) -> None:
        self._response: Json | None = None

    @property
    def complete(self) -> bool:
        return self._response is not None

    def add(self, event: sse.Event) -> None:
        if self._response is not None or event.data == sse.DONE:
            return
        name = event.event
        if name == "error":
            raise _error_event(event)
        if name and name not in _RESPONSE_ENDS and name != "response.failed":
            return  # a delta or progress event: the completed response repeats everything in it
        document = _parse(event)
        kind = document.get("type")
        if not isinstance(kind, str):
            kind = name
        if kind in _RESPONSE_ENDS:
            response = document.get("response")
            if not isinstance(response, dict):
                raise _malformed(f"a {kind} event without a response object")
            self._response = response
        elif kind == "response.failed":
            response = document.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            raise EmbeddedError(error if isinstance(error, dict) else {}, event.data)
        elif kind == "error" or embedded_error(document) is not None:
            raise EmbeddedError(embedded_error(document) or document, event.data)

    def finish(self) -> bytes:
        if self._response is None:
            raise StreamError("The stream ended before response.completed.")
        return _dumps(self._response)
