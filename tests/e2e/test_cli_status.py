"""`fusillade serve` with a routed model and a default route, both to an upstream that keeps every call waiting:
`fusillade status` shows the routes (host and port only) with the requests in flight on each, read from the
database, and the official `openai` SDK lists and retrieves the served models, also after a reload."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from fusillade.mock_upstream import Behaviour, FixedLatency, MockUpstream
from tests.support import polling
from tests.support.processes import Processes

CHAT = "/v1/chat/completions"
ROUTED = "meta-llama/Llama-3.1-8B-Instruct"
"""Routed to the upstream with a limit of 2."""
PRIVATE = "alice-secret-project"
"""No route of its own: the default route (limit 1 per model) takes it."""


def request_lines(model: str, count: int) -> bytes:
    lines = (
        {"custom_id": f"{model}-{index}", "method": "POST", "url": CHAT, "body": {"model": model, "messages": []}}
        for index in range(count)
    )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def test_status_shows_routes_with_their_requests_in_flight_and_the_sdk_lists_models(tmp_path: Path) -> None:
    async with MockUpstream(Behaviour(latency=FixedLatency(600.0))) as upstream, Processes(tmp_path) as processes:
        config = tmp_path / "fusillade.toml"
        host_port = upstream.url.removeprefix("http://")
        config.write_text(
            f'database_url = "sqlite:///{tmp_path / "f.db"}"\n\n'
            '[daemon]\nidle_poll_interval = "50ms"\nshutdown_grace = "0s"\n\n'
            f'[models."{ROUTED}"]\nbase_url = "{upstream.url}/v1"\nconcurrency = 2\n\n'
            f'[models."*"]\nbase_url = "{upstream.url}"\nconcurrency = 1\n'
        )
        server, url = await processes.serve("--config", str(config))
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0) as sdk:
            content = request_lines(ROUTED, 5) + request_lines(PRIVATE, 3)
            uploaded = await sdk.files.create(file=("requests.jsonl", content), purpose="batch")
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")

            async def all_slots_taken() -> bool:
                page: Any = await sdk.get(f"/batches/{batch.id}/requests", cast_to=object)
                return sum(item["state"] in ("claimed", "processing") for item in page["data"]) == 3

            await polling.until(all_slots_taken, within=30, interval=0.05, message="3 requests in flight (2 + 1)")

            code, stdout, stderr = await processes.cli("status", "--json", "--config", str(config))
            assert code == 0, stderr
            assert json.loads(stdout)["routes"] == [
                {"model": ROUTED, "upstream": host_port, "concurrency": 2, "in_flight": 2},
                {"model": "*", "upstream": host_port, "concurrency": 1, "in_flight": 1},
            ]
            code, table, stderr = await processes.cli("status", "--config", str(config))
            assert code == 0, stderr
            assert "Routes" in table and ROUTED in table and "1 per model" in table
            assert host_port in table and f"{host_port}/v1" not in table  # host and port only

            listed = [model.id async for model in sdk.models.list()]
            assert listed == [ROUTED, PRIVATE]
            routed = await sdk.models.retrieve(ROUTED)
            assert (routed.id, routed.owned_by) == (ROUTED, "fusillade")

            config.write_text(config.read_text().replace('[models."*"]', "[models.extra]"))
            server.popen.send_signal(signal.SIGHUP)

            async def reloaded() -> list[str] | None:
                found = [model.id async for model in sdk.models.list()]
                return found if found != listed else None

            assert await polling.until(reloaded, within=10, message="the reloaded routes") == ["extra", ROUTED]
            with pytest.raises(openai.NotFoundError):
                await sdk.models.retrieve(PRIVATE)  # the default route is gone
            assert (await sdk.models.retrieve(ROUTED)).created == routed.created  # kept across the reload
        assert await server.stop() == 0
