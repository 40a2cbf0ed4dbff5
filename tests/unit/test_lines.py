"""Rendering of input, output and error lines (`domain.lines`), and their exact sizes."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.domain import ids, lines, models, states
from tests.support import strategies

FINISHED = datetime(2025, 1, 1, tzinfo=UTC)
REQUEST_ID = ids.RequestId(uuid.UUID(int=0xABC))


def request(**changes: Any) -> models.Request:
    base = models.Request(
        id=REQUEST_ID,
        batch_id=ids.BatchId(uuid.UUID(int=1)),
        template_id=ids.TemplateId(uuid.UUID(int=2)),
        owner="alice",
        custom_id="req-1",
        model="m",
        line_number=1,
        state=states.RequestState.COMPLETED,
        finished_at=FINISHED,
    )
    return dataclasses.replace(base, **changes)


def completed(custom_id: str = "req-1", status: int = 200, body: str | None = '{"ok":true}') -> models.Request:
    return request(custom_id=custom_id, response_status=status, response_body=body)


def failed(
    custom_id: str = "req-1", code: str | None = "timeout", message: str | None = "too slow"
) -> models.Request:
    return request(custom_id=custom_id, state=states.RequestState.FAILED, error_code=code, error_message=message)


# ------------------------------------------------------------------------------------------- shapes


def test_output_line_has_the_openai_shape() -> None:
    rendered = lines.result_line(completed(body='{"choices":[]}'))
    assert rendered.endswith(b"}\n")
    assert rendered.count(b"\n") == 1
    assert orjson.loads(rendered) == {
        "id": ids.request_wire(REQUEST_ID),
        "custom_id": "req-1",
        "response": {"status_code": 200, "request_id": None, "body": {"choices": []}},
        "error": None,
    }


def test_upstream_http_error_keeps_its_response() -> None:
    rendered = orjson.loads(
        lines.result_line(
            request(state=states.RequestState.FAILED, response_status=429, response_body='"slow down"')
        )
    )
    assert rendered["response"] == {"status_code": 429, "request_id": None, "body": "slow down"}
    assert rendered["error"] is None


def test_a_response_without_a_body_renders_null() -> None:
    assert orjson.loads(lines.result_line(completed(body=None)))["response"]["body"] is None


def test_error_line_without_a_response() -> None:
    rendered = orjson.loads(lines.result_line(failed(code="connection_error", message="refused")))
    assert rendered == {
        "id": ids.request_wire(REQUEST_ID),
        "custom_id": "req-1",
        "response": None,
        "error": {"code": "connection_error", "message": "refused"},
    }


def test_expired_and_cancelled_requests_get_the_default_messages() -> None:
    expired = orjson.loads(lines.result_line(failed(code=lines.BATCH_EXPIRED, message=None)))
    cancelled = orjson.loads(lines.result_line(request(state=states.RequestState.CANCELED)))
    assert expired["error"] == {"code": "batch_expired", "message": lines.ERROR_MESSAGES[lines.BATCH_EXPIRED]}
    assert cancelled["error"] == {
        "code": "batch_cancelled",
        "message": lines.ERROR_MESSAGES[lines.BATCH_CANCELLED],
    }


def test_a_failure_without_a_code_still_has_one() -> None:
    rendered = orjson.loads(lines.result_line(failed(code=None, message=None)))
    assert rendered["error"] == {"code": "error", "message": "error"}


def test_input_line_re_emits_the_stored_template() -> None:
    template = models.RequestTemplate(
        id=ids.new_template_id(),
        file_id=ids.new_file_id(),
        line_number=3,
        custom_id='quote " and é',
        method="POST",
        url="/v1/embeddings",
        model="emb",
        body='{"model":"emb","input":"x"}',
    )
    rendered = lines.input_line(template)
    assert rendered == (
        b'{"custom_id":"quote \\" and \xc3\xa9","method":"POST","url":"/v1/embeddings",'
        b'"body":{"model":"emb","input":"x"}}\n'
    )


# -------------------------------------------------------------------------------------------- sizes


def test_sizes_of_fixed_examples() -> None:
    success = completed(custom_id="a", status=200, body="{}")
    error = failed(custom_id="a", code="timeout", message="slow")
    assert lines.response_line_bytes(lines.custom_id_json_bytes("a"), 200, 2) == len(lines.result_line(success))
    assert lines.error_line_bytes(lines.custom_id_json_bytes("a"), "timeout", "slow") == len(
        lines.result_line(error)
    )


json_bodies = strategies.json_values(max_leaves=10).map(lambda value: orjson.dumps(value).decode())
custom_ids = st.text(min_size=1, max_size=64)
request_ids = st.uuids().map(ids.RequestId)


@settings(max_examples=200, deadline=None)
@given(request_ids, custom_ids, st.integers(100, 599), json_bodies)
def test_response_line_size_is_exact(request_id: ids.RequestId, custom_id: str, status: int, body: str) -> None:
    rendered = lines.result_line(
        request(id=request_id, custom_id=custom_id, response_status=status, response_body=body)
    )
    size = lines.response_line_bytes(lines.custom_id_json_bytes(custom_id), status, len(body.encode()))
    assert size == len(rendered)
    parsed = orjson.loads(rendered)
    assert (parsed["custom_id"], parsed["response"]["status_code"]) == (custom_id, status)
    assert parsed["response"]["body"] == orjson.loads(body)


@settings(max_examples=200, deadline=None)
@given(request_ids, custom_ids, st.text(min_size=1), st.text(min_size=1))
def test_error_line_size_is_exact(request_id: ids.RequestId, custom_id: str, code: str, message: str) -> None:
    rendered = lines.result_line(
        request(
            id=request_id,
            state=states.RequestState.FAILED,
            custom_id=custom_id,
            error_code=code,
            error_message=message,
        )
    )
    assert lines.error_line_bytes(lines.custom_id_json_bytes(custom_id), code, message) == len(rendered)
    assert orjson.loads(rendered)["error"] == {"code": code, "message": message}


@settings(max_examples=100, deadline=None)
@given(custom_ids)
def test_custom_id_size_is_its_json_encoding(custom_id: str) -> None:
    assert lines.custom_id_json_bytes(custom_id) == len(orjson.dumps(custom_id))
    assert orjson.loads(orjson.dumps({"custom_id": custom_id}))["custom_id"] == custom_id


@settings(max_examples=100, deadline=None)
@given(custom_ids, st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]), json_bodies)
def test_input_line_round_trips(custom_id: str, url: str, body: str) -> None:
    template = models.RequestTemplate(
        id=ids.new_template_id(),
        file_id=ids.new_file_id(),
        line_number=1,
        custom_id=custom_id,
        method="POST",
        url=url,
        model="m",
        body=body,
    )
    rendered = lines.input_line(template)
    assert rendered.endswith(b"\n")
    assert rendered.count(b"\n") == 1
    assert orjson.loads(rendered) == {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": orjson.loads(body),
    }
