"""JSONL input for the validation tests of `domain.jsonl` (`test_jsonl*.py`): `line` writes one request line,
`collect` runs the validator over chunks and keeps what it yielded and raised."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson

from fusillade import errors
from fusillade.domain import jsonl, models, served
from fusillade.domain.seen_ids import IdsInMemory, SeenIds

CHAT = "/v1/chat/completions"


def line(custom_id: Any = "r1", *, method: Any = "POST", url: Any = CHAT, body: Any = None, **extra: Any) -> bytes:
    record = {"custom_id": custom_id, "method": method, "url": url, "body": body or {"model": "m"}, **extra}
    return orjson.dumps(record) + b"\n"


async def collect(
    chunks: AsyncIterator[bytes] | Iterable[bytes],
    limits: jsonl.Limits = jsonl.DEFAULT_LIMITS,
    model_allowed: Callable[[str], bool] | None = None,
    routing: served.ServedModels | None = None,
    seen_ids: Callable[[], SeenIds] = IdsInMemory,
) -> tuple[list[models.TemplateInput], errors.ValidationError | None]:
    """Every template yielded, and the ValidationError raised at the end (if any)."""
    if not isinstance(chunks, AsyncIterator):
        chunks = from_list(list(chunks))
    templates = []
    try:
        validated = jsonl.validate(chunks, limits, model_allowed=model_allowed, served=routing, seen_ids=seen_ids)
        async for template in validated:
            templates.append(template)
    except errors.ValidationError as exc:
        return templates, exc
    return templates, None


async def from_list(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
