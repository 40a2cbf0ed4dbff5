"""Classification of what an upstream sent back into an Outcome (`upstream.classify`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusillade.clock import ManualClock
from fusillade.domain.usage import Usage
from fusillade.upstream import classify
from fusillade.upstream.outcome import Outcome, Permanent, Retriable, Success
from fusillade.upstream.reassemble import EmbeddedError

CLOCK = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))


def classify_response(status: int, body: bytes, headers: dict[str, str] | None = None, **options: bool) -> Outcome:
    return classify.classify_response(status, headers or {}, body, clock=CLOCK, **options)


def test_a_json_2xx_is_a_success_with_the_body_as_sent() -> None:
    body = b'{"id": "chatcmpl-1", "choices": []}'
    assert classify_response(200, body) == Success(status_code=200, body=body.decode(), usage=None)


def test_a_success_carries_the_usage_its_body_reported() -> None:
    body = b'{"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}'
    result = classify_response(200, body)
    assert isinstance(result, Success)
    assert result.usage == Usage(input_tokens=9, output_tokens=4)


@pytest.mark.parametrize(("body", "stored"), [(b"plain text", "plain text"), (b"", ""), (b"\xff ok", "\ufffd ok")])
def test_a_2xx_that_is_not_json_is_kept_as_a_json_string(body: bytes, stored: str) -> None:
    outcome = classify_response(201, body)
    assert isinstance(outcome, Success)
    assert orjson.loads(outcome.body) == stored


def test_a_2xx_carrying_an_error_is_an_upstream_error() -> None:
    outcome = classify_response(200, b'{"error": {"message": "overloaded", "type": "overloaded_error"}}')
    assert isinstance(outcome, Retriable)
    assert outcome.code == "upstream_error"
    assert "overloaded" in outcome.message


def test_a_responses_body_with_a_null_error_is_a_success() -> None:
    assert isinstance(classify_response(200, b'{"object": "response", "error": null}'), Success)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 599])
def test_retriable_statuses(status: int) -> None:
    body = b'{"error": {"message": "try later", "code": "x"}}'
    outcome = classify_response(status, body)
    assert outcome == Retriable(
        code=f"http_{status}",
        message=f"The upstream answered HTTP {status}: try later.",
        status_code=status,
        body=body.decode(),
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 301, 304])
def test_other_statuses_are_permanent(status: int) -> None:
    outcome = classify_response(status, b"nope")
    assert outcome == Permanent(
        code=f"http_{status}", message=f"The upstream answered HTTP {status}.", status_code=status, body='"nope"'
    )


def test_404_is_retriable_when_the_route_says_so() -> None:
    assert isinstance(classify_response(404, b"{}", retry_404=True), Retriable)


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({"Retry-After-Ms": "1500", "Retry-After": "9"}, timedelta(milliseconds=1500)),
        ({"retry-after": "7"}, timedelta(seconds=7)),
        ({"Retry-After": "Thu, 01 Jan 2026 00:00:30 GMT"}, timedelta(seconds=30)),
        ({}, None),
    ],
)
def test_retry_after_is_read_with_the_clock(headers: dict[str, str], delay: timedelta | None) -> None:
    outcome = classify_response(429, b"{}", headers)
    assert isinstance(outcome, Retriable)
    assert outcome.retry_after == delay


def test_a_long_upstream_message_is_cut() -> None:
    body = orjson.dumps({"error": {"message": "x" * 2000}})
    outcome = classify_response(400, body)
    assert isinstance(outcome, Permanent)
    assert len(outcome.message) < classify.MAX_MESSAGE_CHARS + 50
    assert outcome.body == body.decode()  # the whole body is kept


# ---------------------------------------------------------------------------------------- embedded errors


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        ({"code": 500}, True),
        ({"code": "503"}, True),
        ({"status": 429}, True),
        ({"status_code": 408}, True),
        ({"code": 400}, False),
        ({"code": 404}, False),
        ({"code": "server_error"}, True),
        ({"code": "rate_limit_exceeded"}, True),
        ({"type": "overloaded_error"}, True),
        ({"type": "InternalServerError"}, True),
        ({"type": "service_unavailable"}, True),
        ({"code": "vector_store_timeout"}, True),
        ({"code": "invalid_prompt"}, False),
        ({"type": "BadRequestError", "code": "context_length_exceeded"}, False),
        ({"message": "something"}, False),
        ({}, False),
        ({"code": True}, False),
    ],
)
def test_embedded_error_rule(error: dict[str, object], retriable: bool) -> None:
    outcome = classify.classify_embedded_error(EmbeddedError(error, orjson.dumps({"error": error}).decode()))
    assert isinstance(outcome, Retriable if retriable else Permanent)
    assert outcome.code == "upstream_error"
    assert outcome.status_code is None
    assert outcome.body == orjson.dumps({"error": error}).decode()


def test_embedded_404_follows_the_route() -> None:
    error = EmbeddedError({"code": 404}, "{}")
    assert isinstance(classify.classify_embedded_error(error, retry_404=True), Retriable)


def test_an_embedded_error_that_is_not_json_is_kept_as_a_json_string() -> None:
    outcome = classify.classify_embedded_error(EmbeddedError({"message": "boom"}, "boom"))
    assert outcome.body == '"boom"'
    assert outcome.message == "The upstream reported an error inside its response: boom."


# ---------------------------------------------------------------------------------------- other failures


def test_failure_outcomes_carry_their_codes() -> None:
    assert classify.timeout("idle", "no next SSE event within 60 s") == Retriable(
        code="timeout", message="idle timeout: no next SSE event within 60 s."
    )
    assert classify.connection_error(ConnectionResetError("reset")).code == "connection_error"
    assert "ConnectionResetError: reset" in classify.connection_error(ConnectionResetError("reset")).message
    assert classify.stream_error(ValueError()).message == "The upstream stream broke: ValueError"
    assert classify.response_too_large(10) == Permanent(
        code="response_too_large", message="The upstream response is larger than 10 bytes."
    )
    assert classify.invalid_request("bad").code == "invalid_request"


@given(st.integers(100, 599), st.binary(max_size=64))
def test_every_response_is_classified_and_bodies_are_json(status: int, body: bytes) -> None:
    outcome = classify_response(status, body)
    assert (isinstance(outcome, Success)) == (200 <= status <= 299 and not _carries_error(body))
    if outcome.body is not None:
        orjson.loads(outcome.body)


def _carries_error(body: bytes) -> bool:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and (document.get("error") is not None or document.get("object") == "error")
