"""Identifiers: UUIDs inside, prefixed hex strings on the wire.

| kind    | wire form              |
|---------|------------------------|
| file    | `file-<32 hex>`        |
| batch   | `batch_<32 hex>`       |
| request | `batch_req_<32 hex>`   |
"""

from __future__ import annotations

import re
import uuid
from typing import NewType

from fusillade import errors

FileId = NewType("FileId", uuid.UUID)
BatchId = NewType("BatchId", uuid.UUID)
RequestId = NewType("RequestId", uuid.UUID)
TemplateId = NewType("TemplateId", uuid.UUID)
DaemonId = NewType("DaemonId", uuid.UUID)
ApiKeyId = NewType("ApiKeyId", uuid.UUID)

FILE_PREFIX = "file-"
BATCH_PREFIX = "batch_"
REQUEST_PREFIX = "batch_req_"

# uuid.UUID(hex=...) also takes "+", "_", spaces and a trailing newline (it ends in int(text, 16)).
_HEX_32 = re.compile(r"[0-9a-fA-F]{32}")


def new_file_id() -> FileId:
    return FileId(uuid.uuid4())


def new_batch_id() -> BatchId:
    return BatchId(uuid.uuid4())


def new_request_id() -> RequestId:
    return RequestId(uuid.uuid4())


def new_template_id() -> TemplateId:
    return TemplateId(uuid.uuid4())


def new_daemon_id() -> DaemonId:
    return DaemonId(uuid.uuid4())


def new_api_key_id() -> ApiKeyId:
    return ApiKeyId(uuid.uuid4())


def file_wire(file_id: FileId) -> str:
    return FILE_PREFIX + file_id.hex


def batch_wire(batch_id: BatchId) -> str:
    return BATCH_PREFIX + batch_id.hex


def request_wire(request_id: RequestId) -> str:
    return REQUEST_PREFIX + request_id.hex


def _parse(text: str, prefix: str, kind: str) -> uuid.UUID:
    if not text.startswith(prefix) or len(text) != len(prefix) + 32:
        raise errors.NotFound(f"No {kind} with id {text!r}: {kind} ids look like '{prefix}' + 32 hex digits.")
    if _HEX_32.fullmatch(text, len(prefix)) is None:
        raise errors.NotFound(f"No {kind} with id {text!r}.")
    return uuid.UUID(hex=text[len(prefix) :])


def parse_file_id(text: str) -> FileId:
    """Parse a wire file id; a malformed id is reported as not found (ids are not enumerable)."""
    return FileId(_parse(text, FILE_PREFIX, "file"))


def parse_batch_id(text: str) -> BatchId:
    # "batch_req_..." also starts with "batch_", but its length differs, so it is rejected.
    return BatchId(_parse(text, BATCH_PREFIX, "batch"))


def parse_request_id(text: str) -> RequestId:
    return RequestId(_parse(text, REQUEST_PREFIX, "request"))
