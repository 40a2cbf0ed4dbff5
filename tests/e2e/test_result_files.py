"""A batch's output and error files, seen through the official `openai` SDK: as on OpenAI, each appears with
its first line. A batch whose requests all succeed lists no error file and has `error_file_id: null`; one whose
requests all fail lists no output file."""

from __future__ import annotations

from typing import Final

import openai
import orjson
from openai import AsyncOpenAI

from fusillade.mock_upstream import Behaviour, HttpError, MockUpstream
from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from tests.integration.conftest import routes_for, running
from tests.support import polling
from tests.support.api_server import create_key, running_api

CHAT: Final = "/v1/chat/completions"


def request_lines(prefix: str, count: int) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"{prefix}-{n}",
                "method": "POST",
                "url": CHAT,
                "body": {"model": "model-a", "messages": [{"role": "user", "content": f"hello {n}"}]},
            }
        )
        + b"\n"
        for n in range(count)
    )


async def test_no_empty_result_file_is_listed(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(faults_by_custom_id={f"bad-{n}": [HttpError(400)] for n in range(3)})
    async with (
        running(storage, client, routes_for(upstream, {"model-a": 4})) as daemon,
        running_api(storage, notify_work=daemon.notify_work) as api,
    ):
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key, max_retries=0) as sdk:

            async def run(prefix: str) -> tuple[str, openai.types.Batch]:
                uploaded = await sdk.files.create(
                    file=(f"{prefix}.jsonl", request_lines(prefix, 3)), purpose="batch"
                )
                batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
                assert (batch.output_file_id, batch.error_file_id) == (None, None)  # nothing finished yet

                async def completed() -> openai.types.Batch | None:
                    current = await sdk.batches.retrieve(batch.id)
                    return current if current.status == "completed" else None

                return uploaded.id, await polling.until(
                    completed, within=30, message=f"batch {prefix} to complete"
                )

            good_input, good = await run("good")
            bad_input, bad = await run("bad")

            listed = [file async for file in sdk.files.list()]

    assert good.output_file_id is not None and good.error_file_id is None
    assert bad.output_file_id is None and bad.error_file_id is not None
    assert {file.id for file in listed} == {good_input, bad_input, good.output_file_id, bad.error_file_id}
    assert all(file.bytes > 0 for file in listed)
    purposes = {file.id: file.purpose for file in listed}
    assert (purposes[good.output_file_id], purposes[bad.error_file_id]) == ("batch_output", "batch_error")
