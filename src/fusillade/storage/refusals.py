"""What both storage backends say when they refuse, and how they read the errors stored with a batch.

One place for the words, so that a client gets the same answer from SQLite and PostgreSQL (the contract tests
compare them): an object that is missing (or another owner's: the same words, so ids cannot be probed), an upload
with no request lines, a batch whose input is not an input file or has lines of another endpoint. Backend-free:
the backends run their own queries and pass the rows found here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from fusillade import errors
from fusillade.domain import ids, models

MAX_ENDPOINT_ERRORS: Final = 100
"""Bad lines listed when lines of the input file do not match the batch endpoint (the first ones, in order)."""


def no_file(file_id: ids.FileId) -> errors.NotFound:
    return errors.NotFound(f"No file with id {ids.file_wire(file_id)}.")


def no_batch(batch_id: ids.BatchId) -> errors.NotFound:
    return errors.NotFound(f"No batch with id {ids.batch_wire(batch_id)}.")


def no_request(request_id: ids.RequestId, batch_id: ids.BatchId) -> errors.NotFound:
    """A request cursor (`after`) that is not a request of the batch listed."""
    request, batch = ids.request_wire(request_id), ids.batch_wire(batch_id)
    return errors.NotFound(f"No request with id {request} in batch {batch}.")


def no_daemon(daemon_id: ids.DaemonId) -> errors.NotFound:
    return errors.NotFound(f"No daemon with id {daemon_id}.")


def no_api_key(key_id: ids.ApiKeyId) -> errors.NotFound:
    return errors.NotFound(f"No API key with id {key_id}.")


def empty_file() -> errors.ValidationError:
    """An upload with no request line (nothing is stored)."""
    return errors.ValidationError(
        "The file is empty: upload at least one request line.",
        errors=[errors.LineError(0, "The file has no request lines.")],
    )


def not_an_input_file(file_id: ids.FileId, purpose: str) -> errors.ValidationError:
    """A batch asked of a file that is not a batch input file (an output or error file)."""
    return errors.ValidationError(
        f"File {ids.file_wire(file_id)} is not a batch input file (its purpose is {purpose}); upload a file "
        "with purpose 'batch'."
    )


def endpoint_mismatch(
    file_id: ids.FileId, endpoint: str, mismatched: Iterable[tuple[int, str]]
) -> errors.ValidationError:
    """A batch whose input file has lines for another endpoint: `mismatched` holds (line number, url) of the
    first `MAX_ENDPOINT_ERRORS` of them, in line order."""
    return errors.ValidationError(
        f"File {ids.file_wire(file_id)} has lines whose url does not match the batch endpoint '{endpoint}'.",
        errors=[
            errors.LineError(line, f"url '{url}' does not match the batch endpoint '{endpoint}'")
            for line, url in mismatched
        ],
    )


def batch_errors(stored: Iterable[Mapping[str, Any]] | None) -> tuple[models.BatchError, ...]:
    """The errors of a batch from their stored form: a JSON array (decoded) of objects with `code` and `message`,
    and optionally `line` and `param`; None or empty for none."""
    if not stored:
        return ()
    return tuple(
        models.BatchError(
            code=item["code"], message=item["message"], line=item.get("line"), param=item.get("param")
        )
        for item in stored
    )


def budget_spent(batch_id: ids.BatchId) -> errors.StateConflict:
    """A retry of a batch that spent its budget: sending its failed requests again would spend more."""
    return errors.StateConflict(
        f"Batch {ids.batch_wire(batch_id)} spent its budget; its failed requests cannot be retried (create a "
        "batch of them with a budget of its own).",
        current_state="budget_exceeded",
    )
