"""The mock upstream's pure parts: fault selection, latency sampling, response bodies and stats."""

from __future__ import annotations

import base64
import random
import statistics
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusillade.mock_upstream import behaviour as mock
from fusillade.mock_upstream import responses
from fusillade.mock_upstream.stats import Arrival, UpstreamStats

# ------------------------------------------------------------------------------------------ latency


def test_fixed_latency_is_constant() -> None:
    assert mock.FixedLatency(0.25).sample(random.Random(1)) == 0.25
    assert mock.NO_LATENCY.sample(random.Random(1)) == 0


def test_uniform_latency_stays_in_bounds() -> None:
    rng = random.Random(7)
    samples = [mock.UniformLatency(0.1, 0.3).sample(rng) for _ in range(2000)]
    assert min(samples) >= 0.1
    assert max(samples) <= 0.3
    assert 0.19 < statistics.fmean(samples) < 0.21


def test_lognormal_latency_has_the_asked_median_and_p99() -> None:
    rng = random.Random(3)
    samples = sorted(mock.LogNormalLatency(median=0.1, p99=1.0).sample(rng) for _ in range(40_000))
    assert samples[len(samples) // 2] == pytest.approx(0.1, rel=0.05)
    assert samples[int(len(samples) * 0.99)] == pytest.approx(1.0, rel=0.1)
    assert min(samples) > 0


def test_lognormal_latency_with_equal_median_and_p99_is_fixed() -> None:
    assert mock.LogNormalLatency(0.2, 0.2).sample(random.Random(0)) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mock.FixedLatency(-1),
        lambda: mock.FixedLatency(float("nan")),
        lambda: mock.UniformLatency(0.3, 0.1),
        lambda: mock.UniformLatency(-0.1, 0.1),
        lambda: mock.LogNormalLatency(0, 1),
        lambda: mock.LogNormalLatency(1, 0.5),
    ],
)
def test_latency_rejects_nonsense(make: Any) -> None:
    with pytest.raises(ValueError, match="Latency"):
        make()


# ------------------------------------------------------------------------------------------- faults


def choose(behaviour: mock.Behaviour, custom_id: str | None = "c1", attempt: int | None = 0) -> mock.Fault | None:
    return mock.choose_fault(behaviour, custom_id=custom_id, attempt=attempt, rng=random.Random(0))


def test_no_fault_by_default() -> None:
    assert choose(mock.Behaviour()) is None


def test_a_custom_id_follows_its_script_then_succeeds() -> None:
    behaviour = mock.Behaviour(
        faults_by_custom_id={"c7": [mock.HttpError(500), None, mock.ConnectionReset()]},
        error_rates={503: 1.0},
    )
    faults = [choose(behaviour, "c7", attempt) for attempt in range(5)]
    assert faults == [mock.HttpError(500), None, mock.ConnectionReset(), None, None]
    assert choose(behaviour, "other", 0) == mock.HttpError(503)


def test_fail_first_n_attempts_applies_per_custom_id() -> None:
    behaviour = mock.Behaviour(fail_first_n_attempts=2, first_attempts_fault=mock.HttpError(429))
    assert [choose(behaviour, "c1", attempt) for attempt in range(4)] == [mock.HttpError(429)] * 2 + [None] * 2
    assert choose(behaviour, custom_id=None, attempt=None) is None


def test_random_faults_follow_their_rates() -> None:
    behaviour = mock.Behaviour(error_rates={500: 0.3, 429: 0.1}, fault_rates={mock.ConnectionReset(): 0.2})
    rng = random.Random(11)
    drawn = [mock.choose_fault(behaviour, custom_id=None, attempt=None, rng=rng) for _ in range(20_000)]
    shares = {fault: drawn.count(fault) / len(drawn) for fault in set(drawn)}
    assert shares[mock.HttpError(500)] == pytest.approx(0.3, abs=0.015)
    assert shares[mock.HttpError(429)] == pytest.approx(0.1, abs=0.015)
    assert shares[mock.ConnectionReset()] == pytest.approx(0.2, abs=0.015)
    assert shares[None] == pytest.approx(0.4, abs=0.015)


def test_the_same_seed_gives_the_same_faults() -> None:
    behaviour = mock.Behaviour(error_rates={500: 0.5})

    def run(seed: int) -> list[mock.Fault | None]:
        rng = random.Random(seed)
        return [mock.choose_fault(behaviour, custom_id=None, attempt=None, rng=rng) for _ in range(50)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_no_random_number_is_drawn_without_random_faults() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    mock.choose_fault(mock.Behaviour(fail_first_n_attempts=1), custom_id="c", attempt=3, rng=rng)
    assert rng.getstate() == state


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"error_rates": {500: 1.5}}, "between 0 and 1"),
        ({"error_rates": {500: -0.1}}, "between 0 and 1"),
        ({"error_rates": {500: 0.6, 429: 0.3}, "fault_rates": {mock.ConnectionReset(): 0.2}}, "add up"),
        ({"error_rates": {200: 0.1}}, "between 400 and 599"),
        ({"fail_first_n_attempts": -1}, "fail_first_n_attempts"),
        ({"event_interval_s": -1}, "event_interval_s"),
        ({"embedding_dimensions": 0}, "embedding_dimensions"),
    ],
)
def test_behaviour_rejects_nonsense(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mock.Behaviour(**options)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mock.TruncatedStream(after_events=-1),
        lambda: mock.MalformedEvent(after_events=-1),
        lambda: mock.EmbeddedError(after_events=-1),
        lambda: mock.StallMidStream(after_events=-1),
        lambda: mock.StallMidStream(seconds=-1),
        lambda: mock.StallBeforeFirstByte(float("inf")),
        lambda: mock.HttpError(302),
    ],
)
def test_faults_reject_nonsense(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_behaviour_keeps_its_own_copies_of_the_mappings() -> None:
    rates = {500: 0.5}
    script: dict[str, list[mock.Fault | None]] = {"c1": [mock.HttpError(500)]}
    behaviour = mock.Behaviour(error_rates=rates, faults_by_custom_id=script)
    rates[429] = 0.5
    script["c1"].append(mock.ConnectionReset())
    assert dict(behaviour.error_rates) == {500: 0.5}
    assert behaviour.faults_by_custom_id["c1"] == (mock.HttpError(500),)
    assert behaviour.random_faults == ((0.5, mock.HttpError(500)),)


def test_counts_attempts_only_for_attempt_based_faults() -> None:
    assert not mock.Behaviour(error_rates={500: 0.1}).counts_attempts
    assert mock.Behaviour(fail_first_n_attempts=1).counts_attempts
    assert mock.Behaviour(faults_by_custom_id={"c": [None]}).counts_attempts


def test_a_429_gets_the_default_retry_after() -> None:
    behaviour = mock.Behaviour(retry_after_s=3, retry_after_ms=2500)
    assert mock.retry_after_headers(behaviour, mock.HttpError(429)) == {
        "Retry-After": "3",
        "retry-after-ms": "2500",
    }
    assert mock.retry_after_headers(behaviour, mock.HttpError(500)) == {}
    assert mock.retry_after_headers(mock.Behaviour(retry_after_s=None), mock.HttpError(429)) == {}


def test_a_fault_s_own_retry_after_wins() -> None:
    behaviour = mock.Behaviour(retry_after_s=3)
    assert mock.retry_after_headers(behaviour, mock.HttpError(429, retry_after_ms=20)) == {"retry-after-ms": "20"}
    assert mock.retry_after_headers(behaviour, mock.HttpError(503, retry_after_s=7)) == {"Retry-After": "7"}


def test_every_fault_has_a_kind_name() -> None:
    assert set(mock.FAULT_KINDS) == set(mock.Fault.__args__)


# ---------------------------------------------------------------------------------------- responses

CHAT_BODY = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
    ],
}


def parse_events(events: list[bytes]) -> list[tuple[str | None, str]]:
    """(event type, data) of each encoded SSE event."""
    parsed = []
    for event in events:
        assert event.endswith(b"\n\n")
        fields = dict(line.split(": ", 1) for line in event.decode().strip("\n").split("\n"))
        parsed.append((fields.get("event"), fields["data"]))
    return parsed


def test_reply_text_identifies_the_prompt() -> None:
    assert responses.reply_text("hello") == responses.reply_text("hello")
    assert responses.reply_text("hello") != responses.reply_text("hellp")
    assert "5 characters" in responses.reply_text("hello")


@pytest.mark.parametrize(
    ("endpoint", "body", "prompt"),
    [
        ("chat", CHAT_BODY, "hello there"),
        ("chat", {"messages": [{"role": "system", "content": "x"}]}, ""),
        ("responses", {"input": "plain"}, "plain"),
        ("responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}, "hi"),
        ("completions", {"prompt": "say"}, "say"),
        ("completions", {"prompt": ["a", "b"]}, "b"),
        ("completions", {"prompt": 3}, ""),
        ("embeddings", {"input": ["a", "b"]}, "a\nb"),
    ],
)
def test_prompt_of(endpoint: responses.Endpoint, body: dict[str, Any], prompt: str) -> None:
    assert responses.prompt_of(endpoint, body) == prompt


def test_chat_completion_json() -> None:
    completion = orjson.loads(responses.json_body("chat", CHAT_BODY, "m", 1234, dimensions=8))
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "m"
    assert completion["created"] == 1234
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": responses.reply_text("hello there"),
        "refusal": None,
    }
    assert completion["choices"][0]["finish_reason"] == "stop"
    usage = completion["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_reassembles_into_the_json_answer(include_usage: bool) -> None:
    body = CHAT_BODY | {"stream": True, "stream_options": {"include_usage": include_usage}}
    events = parse_events(responses.stream_events("chat", body, "m", 1234))
    assert events[-1] == (None, "[DONE]")
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(choice["delta"].get("content", "") for chunk in chunks for choice in chunk["choices"])
    expected = orjson.loads(responses.json_body("chat", CHAT_BODY, "m", 1234, dimensions=8))
    assert text == expected["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishing = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]]
    assert [chunk["choices"][0]["finish_reason"] for chunk in finishing] == ["stop"]
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == expected["usage"]
        assert all(chunk["usage"] is None for chunk in chunks[:-1])
    else:
        assert all("usage" not in chunk for chunk in chunks)


def test_completions_json_and_stream_agree() -> None:
    body = {"model": "m", "prompt": "say something", "stream": True, "stream_options": {"include_usage": True}}
    completion = orjson.loads(responses.json_body("completions", body, "m", 1, dimensions=8))
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == responses.reply_text("say something")
    events = parse_events(responses.stream_events("completions", body, "m", 1))
    assert events[-1] == (None, "[DONE]")
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    assert (
        "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
        == completion["choices"][0]["text"]
    )
    assert chunks[-1]["usage"] == completion["usage"]


def test_responses_stream_ends_with_the_full_response() -> None:
    body = {"model": "m", "input": "question", "stream": True}
    events = parse_events(responses.stream_events("responses", body, "m", 9))
    types = [event for event, _ in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    payloads = [orjson.loads(data) for _, data in events]
    assert [payload["type"] for payload in payloads] == types
    assert [payload["sequence_number"] for payload in payloads] == list(range(len(payloads)))
    deltas = "".join(payload["delta"] for payload in payloads if payload["type"] == "response.output_text.delta")
    assert deltas == responses.reply_text("question")
    completed = payloads[-1]["response"]
    assert completed == orjson.loads(responses.json_body("responses", body, "m", 9, dimensions=8))
    assert completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == deltas
    assert payloads[0]["response"]["status"] == "in_progress"


def test_embeddings_are_deterministic_with_the_asked_dimensions() -> None:
    body = {"model": "e", "input": ["a", "b"], "dimensions": 5}
    answer = orjson.loads(responses.json_body("embeddings", body, "e", 1, dimensions=8))
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert answer["data"][0]["embedding"] == responses.embedding_vector("a", 5)
    assert len(answer["data"][1]["embedding"]) == 5
    assert answer["data"][0]["embedding"] != answer["data"][1]["embedding"]
    default = orjson.loads(responses.json_body("embeddings", {"input": "a"}, "e", 1, dimensions=8))
    assert len(default["data"][0]["embedding"]) == 8


def test_base64_embeddings_decode_to_the_float_vector() -> None:
    body = {"model": "e", "input": "a", "encoding_format": "base64"}
    answer = orjson.loads(responses.json_body("embeddings", body, "e", 1, dimensions=4))
    decoded = struct.unpack("<4f", base64.b64decode(answer["data"][0]["embedding"]))
    assert decoded == pytest.approx(responses.embedding_vector("a", 4), abs=1e-6)


@given(st.text())
def test_embedding_values_stay_in_range(text: str) -> None:
    assert all(-1 <= value <= 1 for value in responses.embedding_vector(text, 40))


def test_error_envelope_has_the_openai_fields() -> None:
    assert orjson.loads(responses.error_envelope(429, "slow down")) == {
        "error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    }
    assert orjson.loads(responses.error_envelope(502, "bad"))["error"]["type"] == "server_error"
    event = responses.embedded_error_event(503, "overloaded")
    assert event.startswith(b'data: {"error"')
    assert orjson.loads(event.removeprefix(b"data: "))["error"]["code"] == 503


# -------------------------------------------------------------------------------------------- stats


def arrive(stats: UpstreamStats, custom_id: str | None = None, **headers: str) -> int | None:
    return stats.record_arrival(
        path="/v1/chat/completions",
        model="m",
        custom_id=custom_id,
        headers=headers,
        arrival=Arrival(1.0, 2.0),
        track_custom_id=True,
    )


def test_attempts_are_numbered_per_custom_id() -> None:
    stats = UpstreamStats()
    assert [arrive(stats, "a"), arrive(stats, "b"), arrive(stats, "a"), arrive(stats)] == [0, 0, 1, None]
    assert stats.requests_total == 4
    assert stats.requests_by_model == {"m": 4}
    assert len(stats.attempts_by_custom_id["a"]) == 2


def test_untracked_custom_ids_keep_no_memory() -> None:
    stats = UpstreamStats()
    attempt = stats.record_arrival(
        path="/p", model="m", custom_id="a", headers={}, arrival=Arrival(1, 2), track_custom_id=False
    )
    assert attempt is None
    assert stats.attempts_by_custom_id == {}


def test_in_flight_maxima_per_model() -> None:
    stats = UpstreamStats()
    for model in ["a", "a", "b", "a"]:
        stats.enter(model)
    stats.leave("a")
    stats.leave("a")
    stats.enter("a")
    assert stats.in_flight_by_model == {"a": 2, "b": 1}
    assert stats.max_in_flight_by_model == {"a": 3, "b": 1}
    assert stats.max_in_flight == 4


def test_reset_keeps_what_is_in_flight() -> None:
    stats = UpstreamStats()
    for model in ["a", "a", "b"]:
        stats.enter(model)
    stats.leave("b")
    arrive(stats, "x")
    stats.count_response(200)
    stats.count_fault("http_error")
    stats.reset()
    assert stats.requests_total == 0
    assert stats.attempts_by_custom_id == {}
    assert stats.responses_by_status == {}
    assert stats.faults_by_kind == {}
    assert stats.in_flight == stats.max_in_flight == 2
    assert stats.max_in_flight_by_model == {"a": 2}
    stats.leave("a")
    assert stats.in_flight_by_model == {"a": 1}


def test_recent_headers_are_filtered_and_bounded() -> None:
    stats = UpstreamStats(header_history=2)
    arrive(stats, **{"X-Fusillade-Batch-Id": "b1", "Content-Type": "json", "Authorization": "Bearer k"})
    arrive(stats, **{"traceparent": "00-aa-bb-01", "User-Agent": "x"})
    arrive(stats, **{"Accept": "*/*"})
    arrive(stats, **{"x-fusillade-custom-id": "c3"})
    assert list(stats.recent_headers) == [{"traceparent": "00-aa-bb-01"}, {"x-fusillade-custom-id": "c3"}]


def test_stats_as_json() -> None:
    stats = UpstreamStats()
    arrive(stats, "c1")
    stats.count_response(429)
    document = orjson.loads(orjson.dumps(stats.to_json()))
    assert document["responses_by_status"] == {"429": 1}
    assert document["attempts_by_custom_id"] == {"c1": [{"monotonic": 1.0, "wall": 2.0}]}
    assert document["requests_by_path"] == {"/v1/chat/completions": 1}
