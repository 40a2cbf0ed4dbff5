"""Reassembly of SSE streams into non-streaming bodies (`upstream.reassemble`)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.upstream import reassemble, sse
from fusillade.upstream.reassemble import (
    ChatCompletionReassembler,
    CompletionReassembler,
    EmbeddedError,
    Reassembler,
    ResponsesReassembler,
    StreamError,
)

DONE = sse.Event(sse.DONE)


def event(data: Any, name: str = "") -> sse.Event:
    return sse.Event(data if isinstance(data, str) else orjson.dumps(data).decode(), event=name)


def fold(reassembler: Reassembler, events: list[sse.Event]) -> Any:
    for item in events:
        reassembler.add(item)
    return orjson.loads(reassembler.finish())


def chunk(choices: list[Any], **top: Any) -> sse.Event:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700, "model": "m", **top}
    return event({**base, "choices": choices})


def delta(index: int = 0, finish_reason: str | None = None, logprobs: Any = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": finish_reason}


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


# ---------------------------------------------------------------------------------------- picking


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/chat/completions", ChatCompletionReassembler),
        ("/v1/completions", CompletionReassembler),
        ("/v1/responses", ResponsesReassembler),
        ("/v1/chat/completions/", ChatCompletionReassembler),
        ("/v1/embeddings", None),
    ],
)
def test_the_path_picks_the_reassembler(path: str, kind: type | None) -> None:
    assert reassemble.reassembler_for(path) is kind


# ---------------------------------------------------------------------------------------- chat completions


def test_chat_content_is_concatenated_with_usage_and_top_level_fields() -> None:
    events = [
        chunk([delta(role="assistant", content="")], system_fingerprint="fp_1", usage=None),
        chunk([delta(content="Hel")], usage=None),
        chunk([delta(content="lo")], usage=None),
        chunk([delta(finish_reason="stop")], usage=None),
        chunk([], usage=USAGE),
        DONE,
    ]
    assert fold(ChatCompletionReassembler(), events) == {
        "id": "chatcmpl-1",
        "created": 1700,
        "model": "m",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
        "system_fingerprint": "fp_1",
    }


def test_chat_choices_are_kept_apart_by_index_and_sorted() -> None:
    events = [
        chunk([delta(1, content="B1"), delta(0, content="A1")]),
        chunk([delta(0, content="A2", finish_reason="stop")]),
        chunk([delta(1, content="B2", finish_reason="length")]),
        DONE,
    ]
    choices = fold(ChatCompletionReassembler(), events)["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "A1A2", "stop"),
        (1, "B1B2", "length"),
    ]


def test_chat_tool_calls_are_assembled_by_index() -> None:
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    second = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    events = [
        chunk([delta(role="assistant", content=None, tool_calls=[first])]),
        chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}])]),
        chunk([delta(tool_calls=[second])]),
        chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": ' "Paris"}'}}])]),
        chunk([delta(tool_calls=[{"index": 1, "function": {"arguments": "{}"}}])]),
        chunk([delta(finish_reason="tool_calls")]),
        DONE,
    ]
    message = fold(ChatCompletionReassembler(), events)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    }


def test_chat_refusal_other_strings_and_logprobs_are_merged() -> None:
    token = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    events = [
        chunk(
            [delta(role="assistant", refusal="I can", reasoning_content="think", logprobs={"content": [token]})]
        ),
        chunk([delta(refusal="not.", reasoning_content="ing", logprobs={"content": [token], "refusal": None})]),
        chunk([delta(annotations=[{"type": "url_citation"}], finish_reason="stop")]),
        DONE,
    ]
    choice = fold(ChatCompletionReassembler(), events)["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": "I cannot.",
        "reasoning_content": "thinking",
        "annotations": [{"type": "url_citation"}],
    }
    assert choice["logprobs"] == {"content": [token, token], "refusal": None}


def test_chat_legacy_function_call_is_assembled() -> None:
    events = [
        chunk([delta(function_call={"name": "f", "arguments": '{"a"'})]),
        chunk([delta(function_call={"arguments": ": 1}"})]),
        DONE,
    ]
    message = fold(ChatCompletionReassembler(), events)["choices"][0]["message"]
    assert message["function_call"] == {"name": "f", "arguments": '{"a": 1}'}


def test_events_after_done_are_ignored() -> None:
    reassembler = ChatCompletionReassembler()
    for item in [chunk([delta(content="x")]), DONE, event("not json"), chunk([delta(content="y")])]:
        reassembler.add(item)
    assert reassembler.complete
    assert orjson.loads(reassembler.finish())["choices"][0]["message"]["content"] == "x"


@settings(max_examples=100)
@given(st.lists(st.text(max_size=10), min_size=1, max_size=20))
def test_any_split_of_the_content_reassembles_to_the_whole(pieces: list[str]) -> None:
    events = [chunk([delta(content=piece)]) for piece in pieces] + [DONE]
    assert fold(ChatCompletionReassembler(), events)["choices"][0]["message"]["content"] == "".join(pieces)


# ---------------------------------------------------------------------------------------- completions


def test_completion_text_logprobs_and_usage() -> None:
    def part(text: str, **fields: Any) -> sse.Event:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None, **fields}
        return event(
            {"id": "cmpl-1", "object": "text_completion", "created": 9, "model": "m", "choices": [choice]}
        )

    logprobs = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": None, "text_offset": [0]}
    events = [
        part("Once", logprobs=logprobs),
        part(" upon", logprobs=logprobs, finish_reason="length"),
        event({"id": "cmpl-1", "choices": [], "usage": USAGE}),
        DONE,
    ]
    assert fold(CompletionReassembler(), events) == {
        "id": "cmpl-1",
        "created": 9,
        "model": "m",
        "object": "text_completion",
        "choices": [
            {
                "text": "Once upon",
                "index": 0,
                "logprobs": {
                    "tokens": ["a", "a"],
                    "token_logprobs": [-0.5, -0.5],
                    "top_logprobs": None,
                    "text_offset": [0, 0],
                },
                "finish_reason": "length",
            }
        ],
        "usage": USAGE,
    }


# ---------------------------------------------------------------------------------------- responses

RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "output": [], "usage": USAGE}


def test_responses_take_the_completed_response() -> None:
    events = [
        event({"type": "response.created", "response": {**RESPONSE, "status": "in_progress"}}, "response.created"),
        event({"type": "response.output_text.delta", "delta": "Hi"}, "response.output_text.delta"),
        event("not even JSON", "response.output_text.delta"),  # skipped unread: the name says it is a delta
        event({"type": "response.completed", "response": RESPONSE}, "response.completed"),
    ]
    assert fold(ResponsesReassembler(), events) == RESPONSE


def test_responses_without_event_names_are_read_by_type() -> None:
    incomplete = {**RESPONSE, "status": "incomplete"}
    events = [
        event({"type": "response.output_text.delta", "delta": "Hi"}),
        event({"type": "response.incomplete", "response": incomplete}),
    ]
    assert fold(ResponsesReassembler(), events) == incomplete


def test_responses_failed_is_an_embedded_error() -> None:
    failed = {
        "type": "response.failed",
        "response": {**RESPONSE, "error": {"code": "server_error", "message": "x"}},
    }
    with pytest.raises(EmbeddedError) as caught:
        ResponsesReassembler().add(event(failed, "response.failed"))
    assert caught.value.error == {"code": "server_error", "message": "x"}


def test_responses_error_event_is_an_embedded_error() -> None:
    data = {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "sequence_number": 3}
    with pytest.raises(EmbeddedError) as caught:
        ResponsesReassembler().add(event(data, "error"))
    assert caught.value.error["code"] == "rate_limit_exceeded"


def test_responses_ending_before_completion_is_broken() -> None:
    reassembler = ResponsesReassembler()
    reassembler.add(event({"type": "response.created", "response": RESPONSE}, "response.created"))
    with pytest.raises(StreamError, match=r"response\.completed"):
        reassembler.finish()


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make", [ChatCompletionReassembler, CompletionReassembler])
def test_a_stream_without_done_is_broken(make: type[Reassembler]) -> None:
    reassembler = make()
    reassembler.add(chunk([delta(content="partial")]))
    with pytest.raises(StreamError, match=r"\[DONE\]"):
        reassembler.finish()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not an object"),
        ('{"choices": {"0": 1}}', "choices that are not a list"),
        ('{"choices": [3]}', "choice that is not an object"),
        ('{"choices": [{"index": -1}]}', "index"),
        ('{"choices": [{"index": 0, "delta": "x"}]}', "delta"),
        ('{"choices": [{"index": 0, "delta": {"tool_calls": {}}}]}', "tool_calls"),
        ('{"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": 1}}]}}]}', "arguments"),
        ('{"choices": [{"index": 0, "logprobs": [1]}]}', "logprobs"),
    ],
)
def test_malformed_chunks_are_stream_errors(data: str, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        ChatCompletionReassembler().add(sse.Event(data))


@pytest.mark.parametrize(
    ("data", "name", "error"),
    [
        ('{"error": {"message": "boom", "code": 500}}', "", {"message": "boom", "code": 500}),
        (
            '{"object": "error", "message": "bad", "code": 400}',
            "",
            {"object": "error", "message": "bad", "code": 400},
        ),
        ('{"error": "plain text"}', "", {"message": "plain text"}),
        ('{"error": {"type": "overloaded_error"}}', "error", {"type": "overloaded_error"}),
        ("Internal failure", "error", {"message": "Internal failure"}),
    ],
)
def test_embedded_errors_are_reported_with_their_data(data: str, name: str, error: dict[str, Any]) -> None:
    with pytest.raises(EmbeddedError) as caught:
        ChatCompletionReassembler().add(sse.Event(data, event=name))
    assert caught.value.error == error
    assert caught.value.raw == data


KEYS = ["choices", "index", "delta", "content", "tool_calls", "function", "arguments", "name", "logprobs", "error"]
KEYS += ["usage", "finish_reason", "role", "text", "type", "response", "object", "id", "function_call"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=400)
@given(
    st.lists(st.tuples(JSON, st.sampled_from(["", "error", "response.completed", "response.failed"])), max_size=6)
)
def test_arbitrary_json_raises_only_the_documented_errors(items: list[tuple[Any, str]]) -> None:
    for make in (ChatCompletionReassembler, CompletionReassembler, ResponsesReassembler):
        reassembler: Reassembler = make()
        try:
            for data, name in items:
                reassembler.add(event(data, name))
            orjson.loads(reassembler.finish())
        except (StreamError, EmbeddedError):
            pass
