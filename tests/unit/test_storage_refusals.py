"""`storage.refusals`: the refusals both backends share, and the batch errors read from their stored form (the
contract tests check the messages through each backend)."""

from __future__ import annotations

from fusillade.domain import ids, models
from fusillade.storage import refusals


def test_batch_errors_are_read_with_their_optional_fields() -> None:
    stored: list[dict[str, object]] = [
        {"code": "invalid_url", "message": "url does not match", "line": 3, "param": "url"},
        {"code": "empty_file", "message": "no lines"},
    ]

    assert refusals.batch_errors(stored) == (
        models.BatchError(code="invalid_url", message="url does not match", line=3, param="url"),
        models.BatchError(code="empty_file", message="no lines", line=None, param=None),
    )
    assert refusals.batch_errors(None) == ()
    assert refusals.batch_errors([]) == ()


def test_an_endpoint_mismatch_lists_each_line_given() -> None:
    file_id = ids.new_file_id()

    refusal = refusals.endpoint_mismatch(file_id, "/v1/chat/completions", [(2, "/v1/embeddings")])

    assert ids.file_wire(file_id) in refusal.message
    assert [(error.line, error.reason) for error in refusal.errors] == [
        (2, "url '/v1/embeddings' does not match the batch endpoint '/v1/chat/completions'")
    ]
