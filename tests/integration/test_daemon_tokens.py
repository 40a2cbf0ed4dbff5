"""The daemon's token counters (`fusillade_tokens_total{model,kind}`, `fusillade_requests_without_usage_total`)
against what the batch itself reports: on each backend, a batch across a plain route and a streamed one to the
mock upstream, and a route to an upstream that reports no usage, with a retried request and a failed one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from fusillade.domain.usage import Usage
from fusillade.metrics import DaemonMetrics
from fusillade.mock_upstream import Behaviour, HttpError, MockUpstream
from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from tests.integration.conftest import routes_for, running
from tests.integration.test_daemon import finished
from tests.support import factories


@pytest.fixture
async def without_usage() -> AsyncIterator[str]:
    """An upstream whose chat completions report no usage (as llama.cpp's streams do): its URL."""

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        completion = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        }
        return web.Response(body=orjson.dumps(completion), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def counted(metrics: DaemonMetrics, model: str) -> tuple[Usage, int]:
    """What the daemon's counters say of `model`: its tokens, and its requests completed without usage."""

    def sample(name: str, labels: dict[str, str]) -> int:
        value = metrics.registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return int(value)

    def kind(name: str) -> int:
        return sample("fusillade_tokens_total", {"model": model, "kind": name})

    usage = Usage(kind("input"), kind("cached_input"), kind("output"), kind("reasoning"))
    return usage, sample("fusillade_requests_without_usage_total", {"model": model})


async def test_token_counters_equal_the_usage_the_batch_reports(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient, without_usage: str
) -> None:
    upstream.behaviour = Behaviour(faults_by_custom_id={"req-4": [HttpError(500)], "req-7": [HttpError(400)]})
    routes = {
        **routes_for(upstream, {"plain": 4}),
        **routes_for(upstream, {"streamed": 4}, stream=True),
        "no-usage": Route(base_url=without_usage, concurrency=4),
    }
    names = ["plain", "streamed", "no-usage"]
    batch = await factories.create_batch(storage, models_by_line=[names[line % 3] for line in range(60)])

    async with running(storage, client, routes) as daemon:
        done = await finished(storage, batch)
    # read once the daemon stopped: every write's callback has run

    assert done.counts.completed == 59 and done.counts.failed == 1
    assert len(upstream.stats.attempts_by_custom_id["req-4"]) == 2  # retried, counted once
    by_model = {model.model: model for model in done.usage}
    assert (by_model["plain"].requests, by_model["streamed"].requests) == (19, 20)  # req-7 failed
    assert by_model["streamed"].usage.output_tokens > 0
    assert by_model["no-usage"].unknown == 20 and by_model["no-usage"].usage == Usage()
    for model in names:
        assert counted(daemon.metrics, model) == (by_model[model].usage, by_model[model].unknown), model
    totals = [counted(daemon.metrics, model) for model in names]
    assert sum((usage for usage, _ in totals), Usage()) == done.total_usage
    assert sum(unknown for _, unknown in totals) == done.usage_unknown == 20
