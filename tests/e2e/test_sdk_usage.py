"""Usage and cost through the official `openai` SDK (each test once per backend): a batch of 1,000 requests, half
of them streamed, run by the real daemon against the mock upstream; the batch's `usage` is the exact sum of what
the upstream reported in each response, and its `cost` is exact for the configured prices."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import openai
import orjson
import pytest
from openai import AsyncOpenAI

from fusillade.domain.prices import Prices
from fusillade.domain.usage import Pricing
from fusillade.mock_upstream import MockUpstream
from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from tests.integration.conftest import routes_for, running
from tests.support import polling
from tests.support.api_server import create_key, running_api

CHAT: Final = "/v1/chat/completions"
PRICES: Final = Prices(
    routed={
        "model-a": Pricing.per_million(input="0.15", cached_input="0.075", output="0.6"),
        "model-b": Pricing.per_million(input=3, output=15),
    }
)
UNPRICED_B: Final = Prices(routed={"model-a": PRICES.of("model-a"), "model-b": None})


def request_lines(count: int) -> bytes:
    """Odd lines for model-a (sent plainly), even lines for model-b (its route streams), prompts of growing
    length so that every request reports different token counts."""
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"req-{n}",
                "method": "POST",
                "url": CHAT,
                "body": {
                    "model": "model-a" if n % 2 else "model-b",
                    "messages": [{"role": "user", "content": "word " * (n % 37) + f"question {n}"}],
                },
            }
        )
        + b"\n"
        for n in range(1, count + 1)
    )


async def test_usage_sums_and_cost_are_exact(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    routes = {**routes_for(upstream, {"model-a": 32}), **routes_for(upstream, {"model-b": 32}, stream=True)}
    async with (
        running(storage, client, routes) as daemon,
        running_api(storage, notify_work=daemon.notify_work, prices=PRICES) as api,
    ):
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key) as sdk:
            uploaded = await sdk.files.create(file=("requests.jsonl", request_lines(1000)), purpose="batch")
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
            assert batch.model is None  # two models
            assert batch.usage is not None and batch.usage.total_tokens == 0

            async def completed() -> Any:
                current = await sdk.batches.retrieve(batch.id)
                return current if current.status == "completed" else None

            done = await polling.until(completed, within=60, message="the batch to complete")
            assert done.output_file_id is not None and done.error_file_id is None
            output = [
                orjson.loads(line) for line in (await sdk.files.content(done.output_file_id)).content.splitlines()
            ]
            raw = (await sdk.batches.with_raw_response.retrieve(batch.id)).http_response.json()

    assert len(output) == 1000
    reported: dict[str, list[int]] = {"model-a": [0, 0], "model-b": [0, 0]}
    for line in output:
        body = line["response"]["body"]
        assert body["usage"] is not None  # the streamed answers were reassembled with their usage chunk
        totals = reported[body["model"]]
        totals[0] += body["usage"]["prompt_tokens"]
        totals[1] += body["usage"]["completion_tokens"]
    input_tokens = reported["model-a"][0] + reported["model-b"][0]
    output_tokens = reported["model-a"][1] + reported["model-b"][1]
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (input_tokens, output_tokens)
    assert done.usage.total_tokens == input_tokens + output_tokens
    assert (done.usage.input_tokens_details.cached_tokens, done.usage.output_tokens_details.reasoning_tokens) == (
        0,
        0,
    )
    assert raw["requests_without_usage"] == 0

    million = Decimal(1_000_000)
    expected_input = (reported["model-a"][0] * Decimal("0.15") + reported["model-b"][0] * Decimal(3)) / million
    expected_output = (reported["model-a"][1] * Decimal("0.6") + reported["model-b"][1] * Decimal(15)) / million
    assert done.model_extra is not None and done.model_extra["cost"] == raw["cost"]  # as the README reads it
    assert raw["cost"] == {
        "currency": "usd",
        "input": float(expected_input),
        "output": float(expected_output),
        "total": float(expected_input + expected_output),
    }


async def test_a_budget_stops_the_batch_after_at_most_what_was_in_flight(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    concurrency, budget = 4, 300
    async with (
        running(storage, client, routes_for(upstream, {"model-a": concurrency})) as daemon,
        running_api(storage, notify_work=daemon.notify_work, prices=PRICES) as api,
    ):
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key) as sdk:
            lines = b"".join(line for line in request_lines(400).splitlines(keepends=True) if b"model-a" in line)
            uploaded = await sdk.files.create(file=("requests.jsonl", lines), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint=CHAT,
                completion_window="24h",
                extra_body={"budget": {"max_total_tokens": budget}},
            )

            async def completed() -> Any:
                current = await sdk.batches.retrieve(batch.id)
                return current if current.status == "completed" else None

            done = await polling.until(completed, within=60, message="the batch to stop and complete")
            assert done.output_file_id is not None and done.error_file_id is not None
            output = [
                orjson.loads(line) for line in (await sdk.files.content(done.output_file_id)).content.splitlines()
            ]
            failed = [
                orjson.loads(line) for line in (await sdk.files.content(done.error_file_id)).content.splitlines()
            ]
            raw = (await sdk.batches.with_raw_response.retrieve(batch.id)).http_response.json()

    assert len(output) + len(failed) == 200
    assert {line["error"]["code"] for line in failed} == {"budget_exceeded"}
    spent = [line["response"]["body"]["usage"]["total_tokens"] for line in output]
    assert done.usage is not None and done.usage.total_tokens == sum(spent) >= budget
    # The calls after the budget was reached are at most those in flight then: removing any `concurrency` of the
    # completed requests leaves less than the budget.
    assert sum(sorted(spent)[: len(spent) - concurrency]) < budget
    assert upstream.stats.requests_total == len(output)
    assert raw["budget"]["max_total_tokens"] == budget and raw["budget"]["exceeded_at"] is not None


async def test_a_bad_budget_is_refused_with_its_field(storage: base.Storage) -> None:
    async with running_api(storage, prices=UNPRICED_B) as api:
        key = await create_key(storage, "alice")
        async with AsyncOpenAI(base_url=api.base_url, api_key=key, max_retries=0) as sdk:
            uploaded = await sdk.files.create(file=("requests.jsonl", request_lines(2)), purpose="batch")
            for budget, said in (
                ({"max_total_tokens": 0}, "max_total_tokens"),
                ({"max_cost": -1}, "max_cost"),
                ({}, "set max_total_tokens, max_cost or both"),
                ({"max_tokens": 5}, "max_tokens"),
                # model-b has no price: a cost budget cannot be kept.
                ({"max_cost": 1}, "model 'model-b' of the input file has no pricing"),
            ):
                with pytest.raises(openai.BadRequestError) as refused:
                    await sdk.batches.create(
                        input_file_id=uploaded.id,
                        endpoint=CHAT,
                        completion_window="24h",
                        extra_body={"budget": budget},
                    )
                assert said in refused.value.message, (budget, refused.value.message)
