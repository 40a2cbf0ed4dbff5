"""Scenario 6, hostile input: what a careless or malicious client or upstream sends never crashes fusillade and
never leaves half of an upload behind.

- This file: hostile JSONL files (`hostile_input.hostile_files`: good lines mixed with hostile ones) through
  `jsonl.validate` alone, many of them, cut in random chunks: only `ValidationError`, naming exactly the bad lines.
- `test_hostile_uploads.py`: the same files, broken multipart forms and explicit refusals over the real HTTP API.
- `test_hostile_upstream.py`: malformed, truncated and garbled upstream answers.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusillade import errors
from fusillade.domain import jsonl, models
from tests.reliability.hostile_input import LIMITS, HostileFile, examples, hostile_files
from tests.support.api_server import ROUTED_MODELS

pytestmark = pytest.mark.reliability


async def validate(
    data: bytes, chunk_size: int
) -> tuple[list[models.TemplateInput], errors.ValidationError | None]:
    templates: list[models.TemplateInput] = []
    try:
        async for template in jsonl.validate(
            jsonl.iterate_chunks(data, chunk_size), LIMITS, model_allowed=ROUTED_MODELS.__contains__
        ):
            templates.append(template)
    except errors.ValidationError as exc:
        return templates, exc
    return templates, None


@examples(300)
@given(hostile_files(), st.integers(1, 300))
async def test_the_validator_reports_exactly_the_hostile_lines(file: HostileFile, chunk_size: int) -> None:
    templates, error = await validate(file.data, chunk_size)

    if file.bad_lines:
        assert error is not None, file.kinds
        assert [line.line for line in error.errors] == list(file.bad_lines), (file.kinds, error.errors)
        assert all(line.reason for line in error.errors)
    else:
        assert error is None, error.errors if error else None
        assert len(templates) == file.requests
        assert all(orjson.loads(template.body) for template in templates)
