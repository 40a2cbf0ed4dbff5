"""The official `openai` SDK, unchanged but for its `base_url`, against the API on a real socket (each test once
per backend): a batch run by the real daemon against the mock upstream, the sync client's auto-paging and
cancel, the SDK's exception classes, and an SDK retry of a create after a 5xx that leaves one batch."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Final

import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from fusillade.domain import ids
from fusillade.mock_upstream import Behaviour, HttpError, MockUpstream
from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from tests.integration.conftest import routes_for, running
from tests.support import factories, polling
from tests.support.api_server import FlakyStorage, create_key, routed, running_api

CHAT: Final = "/v1/chat/completions"


def request_lines(count: int, *, prefix: str = "req") -> bytes:
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
        for n in range(1, count + 1)
    )


def parsed_lines(content: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in content.splitlines()]


async def test_a_batch_runs_end_to_end_through_the_async_client_and_the_daemon(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    upstream.behaviour = Behaviour(faults_by_custom_id={"req-3": [HttpError(400)], "req-7": [HttpError(422)]})
    content = request_lines(20)
    async with (
        running(storage, client, routes_for(upstream, {"model-a": 4})) as daemon,
        running_api(storage, notify_work=daemon.notify_work) as api,
    ):
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key) as sdk:
            uploaded = await sdk.files.create(file=("requests.jsonl", content), purpose="batch")
            assert (uploaded.object, uploaded.purpose, uploaded.status) == ("file", "batch", "processed")
            assert (uploaded.bytes, uploaded.filename) == (len(content), "requests.jsonl")
            assert await sdk.files.retrieve(uploaded.id) == uploaded

            batch = await sdk.batches.create(
                input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"run": "e2e"}
            )
            assert batch.request_counts is not None and batch.request_counts.total == 20
            assert (batch.status, batch.metadata) == ("in_progress", {"run": "e2e"})

            async def completed() -> openai.types.Batch | None:
                current = await sdk.batches.retrieve(batch.id)
                return current if current.status == "completed" else None

            done = await polling.until(completed, within=30, message="the batch to complete")
            assert done is not None
            assert api.notified == [1]

            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (18, 2)
            assert done.completed_at is not None and done.finalizing_at is not None
            assert done.output_file_id is not None and done.error_file_id is not None
            output = parsed_lines((await sdk.files.content(done.output_file_id)).content)
            failed = parsed_lines((await sdk.files.content(done.error_file_id)).content)
            echoed = parsed_lines((await sdk.files.content(uploaded.id)).content)

            deleted = await sdk.files.delete(uploaded.id)
            assert (deleted.id, deleted.deleted) == (uploaded.id, True)
            with pytest.raises(openai.NotFoundError):
                await sdk.files.retrieve(uploaded.id)

    expected = {f"req-{n}" for n in range(1, 21)} - {"req-3", "req-7"}
    assert Counter(line["custom_id"] for line in output) == dict.fromkeys(expected, 1)
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output)
    assert sorted((line["custom_id"], line["response"]["status_code"]) for line in failed) == [
        ("req-3", 400),
        ("req-7", 422),
    ]
    assert echoed == parsed_lines(content)


async def test_the_sync_client_pages_through_lists_and_cancels(storage: base.Storage) -> None:
    async with running_api(storage) as api:
        key = await create_key(storage, "alice")
        sdk = OpenAI(base_url=api.base_url, api_key=key, max_retries=0)

        def create_all() -> tuple[list[str], list[str]]:
            files = [
                sdk.files.create(file=(f"part-{n}.jsonl", request_lines(2, prefix=f"p{n}")), purpose="batch").id
                for n in range(5)
            ]
            batches = [
                sdk.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id
                for file_id in files
            ]
            return files, batches

        def read_lists() -> tuple[list[str], list[str], int]:
            listed_files = [item.id for item in sdk.files.list(purpose="batch", limit=2, order="asc")]
            listed_batches = [item.id for item in sdk.batches.list(limit=2)]
            first_page = sdk.batches.list(limit=2)
            return listed_files, listed_batches, len(first_page.data)

        try:
            files, batches = await asyncio.to_thread(create_all)
            listed_files, listed_batches, first_page_size = await asyncio.to_thread(read_lists)
            cancelled = await asyncio.to_thread(sdk.batches.cancel, batches[0])
            other_model = await factories.upload(storage, owner="alice", model="model-b")
            finished = await factories.create_batch(storage, owner="alice", file=other_model)
            await factories.run_to_completion(storage, finished, model="model-b")
            await storage.finalize_batches()
            with pytest.raises(openai.BadRequestError) as refused:
                await asyncio.to_thread(sdk.batches.cancel, ids.batch_wire(finished.id))
        finally:
            await asyncio.to_thread(sdk.close)

    assert listed_files == files
    assert listed_batches == batches[::-1]
    assert first_page_size == 2
    assert (cancelled.status, cancelled.cancelled_at is not None) == ("cancelled", True)
    assert refused.value.status_code == 400
    assert refused.value.code == "invalid_state"
    assert refused.value.response.headers["x-should-retry"] == "false"


async def test_errors_map_to_the_sdk_exception_classes(storage: base.Storage) -> None:
    async with running_api(storage) as api:
        alice = await create_key(storage, "alice")
        bob = await create_key(storage, "bob")
        async with (
            AsyncOpenAI(base_url=api.base_url, api_key=alice) as alice_sdk,
            AsyncOpenAI(base_url=api.base_url, api_key=bob) as bob_sdk,
            AsyncOpenAI(base_url=api.base_url, api_key="fus_not-a-key", max_retries=0) as stranger,
        ):
            bad_file = request_lines(2) + b"not json\n" + request_lines(1, prefix="x") + b'{"custom_id": "y"}\n'
            with pytest.raises(openai.BadRequestError) as bad:
                await alice_sdk.files.create(file=("bad.jsonl", bad_file), purpose="batch")

            uploaded = await alice_sdk.files.create(file=("good.jsonl", request_lines(2)), purpose="batch")
            batch = await alice_sdk.batches.create(
                input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
            )
            with pytest.raises(openai.NotFoundError):
                await bob_sdk.batches.retrieve(batch.id)
            with pytest.raises(openai.NotFoundError):
                await bob_sdk.batches.cancel(batch.id)
            with pytest.raises(openai.NotFoundError):
                await bob_sdk.files.content(uploaded.id)
            with pytest.raises(openai.AuthenticationError) as unauthenticated:
                await stranger.batches.list()
            still_running = await alice_sdk.batches.retrieve(batch.id)

    assert bad.value.status_code == 400
    assert (bad.value.param, bad.value.code) == ("file", "invalid_file")
    assert isinstance(bad.value.body, dict)
    assert [line["line"] for line in bad.value.body["lines"]] == [3, 5]
    assert "line 3:" in bad.value.message and "line 5:" in bad.value.message
    assert unauthenticated.value.code == "invalid_api_key"
    assert still_running.status == "in_progress"


async def test_an_sdk_retry_after_a_5xx_on_create_leaves_one_batch(storage: base.Storage) -> None:
    flaky = FlakyStorage(storage)
    async with running_api(flaky.as_storage()) as api:
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key, max_retries=2) as sdk:
            uploaded = await sdk.files.create(file=("in.jsonl", request_lines(3)), purpose="batch")
            flaky.lose_create_answers = 1
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
            listed = [item.id async for item in sdk.batches.list()]

    assert flaky.lose_create_answers == 0, "the first create did commit and answer 503"
    assert listed == [batch.id]
    assert batch.request_counts is not None and batch.request_counts.total == 3


async def test_the_sdk_lists_and_retrieves_models_and_reads_the_no_route_refusal(storage: base.Storage) -> None:
    llama = "meta-llama/Llama-3.1-8B-Instruct"
    with_default = routed("model-a", llama, default_route=True)
    routing = [with_default]
    async with running_api(storage, served_models=lambda: routing[0]) as api:
        alice = await create_key(storage, "alice")
        bob = await create_key(storage, "bob")
        async with (
            AsyncOpenAI(base_url=api.base_url, api_key=alice, max_retries=0) as alice_sdk,
            AsyncOpenAI(base_url=api.base_url, api_key=bob, max_retries=0) as bob_sdk,
        ):
            private = request_lines(1).replace(b'"model-a"', b'"org/alice-fine-tune"')
            await alice_sdk.files.create(file=("private.jsonl", private), purpose="batch")
            alice_models = [model async for model in alice_sdk.models.list()]
            bob_models = [model.id async for model in bob_sdk.models.list()]
            retrieved = await alice_sdk.models.retrieve(llama)
            own = await alice_sdk.models.retrieve("org/alice-fine-tune")
            with pytest.raises(openai.NotFoundError) as hidden:
                await bob_sdk.models.retrieve("org/alice-fine-tune")
            with pytest.raises(openai.NotFoundError):
                await alice_sdk.models.retrieve("gpt-9")

            routing[0] = routed("model-a", llama)  # reloaded without the default route
            with pytest.raises(openai.BadRequestError) as refused:
                await bob_sdk.files.create(file=("late.jsonl", private), purpose="batch")

    assert [model.id for model in alice_models] == [llama, "model-a", "org/alice-fine-tune"]
    assert {(model.object, model.owned_by) for model in alice_models} == {("model", "fusillade")}
    assert bob_models == [llama, "model-a"]
    assert (retrieved.id, retrieved.created) == (llama, int(with_default.routes[llama].timestamp()))
    assert own.id == "org/alice-fine-tune"
    assert own.created == next(model.created for model in alice_models if model.id == own.id)
    assert hidden.value.code == "not_found"
    assert "served models: meta-llama/Llama-3.1-8B-Instruct, model-a." in refused.value.message


async def test_no_empty_result_file_is_listed(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    """As on OpenAI, a result file appears with its first line: a batch whose requests all succeed lists no
    error file (`error_file_id` null), one whose requests all fail no output file."""
    upstream.behaviour = Behaviour(faults_by_custom_id={f"bad-{n}": [HttpError(400)] for n in range(1, 4)})
    async with (
        running(storage, client, routes_for(upstream, {"model-a": 4})) as daemon,
        running_api(storage, notify_work=daemon.notify_work) as api,
    ):
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key, max_retries=0) as sdk:

            async def run(prefix: str) -> tuple[str, openai.types.Batch]:
                uploaded = await sdk.files.create(
                    file=(f"{prefix}.jsonl", request_lines(3, prefix=prefix)), purpose="batch"
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


async def test_a_retry_after_its_result_files_were_deleted_gives_new_reachable_ones(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    """The user deleted the batch's output and error files, then retried its failed requests: the batch points at
    new files, which the SDK downloads; the deleted ones stay 404."""
    upstream.behaviour = Behaviour(faults_by_custom_id={"req-2": [HttpError(400)], "req-3": [HttpError(400)]})
    async with (
        running(storage, client, routes_for(upstream, {"model-a": 4})) as daemon,
        running_api(storage, notify_work=daemon.notify_work) as api,
    ):
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key, max_retries=0) as sdk:
            uploaded = await sdk.files.create(file=("requests.jsonl", request_lines(4)), purpose="batch")
            created = await sdk.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")

            async def completed() -> openai.types.Batch | None:
                current = await sdk.batches.retrieve(created.id)
                return current if current.status == "completed" else None

            first = await polling.until(completed, within=30, message="the batch to complete")
            assert first.output_file_id is not None and first.error_file_id is not None
            for file_id in (first.output_file_id, first.error_file_id):
                assert (await sdk.files.delete(file_id)).deleted

            # The faults were used up: the retried requests succeed this time.
            retried = await sdk.post(f"/batches/{created.id}/retry", cast_to=openai.types.Batch)
            assert retried.status == "in_progress"
            done = await polling.until(completed, within=30, message="the retried batch to complete")
            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
            assert done.output_file_id not in (None, first.output_file_id)
            assert done.error_file_id is None, "the new error file has no line: it does not show"
            output = parsed_lines((await sdk.files.content(done.output_file_id)).content)
            with pytest.raises(openai.NotFoundError):
                await sdk.files.content(first.output_file_id)

    assert sorted(line["custom_id"] for line in output) == ["req-1", "req-2", "req-3", "req-4"]
