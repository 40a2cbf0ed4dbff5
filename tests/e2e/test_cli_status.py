"""`fusillade serve` with a routed model and a default route, both to an upstream that keeps every call waiting:
`fusillade status` shows the routes (host and port only) with the requests in flight on each, read from the
database, and the official `openai` SDK lists and retrieves the served models, also after a reload. Then the
tokens and cost of finished batches, left by `fusillade run`."""

from __future__ import annotations

import json
import signal
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from fusillade.mock_upstream import Behaviour, FixedLatency, MockUpstream
from tests.e2e.test_cli_run import fusillade, priced_config, read_lines, reported_usage, write_requests
from tests.support import polling
from tests.support.processes import Processes

CHAT = "/v1/chat/completions"
ROUTED = "meta-llama/Llama-3.1-8B-Instruct"
"""Routed to the upstream with a limit of 2."""
PRIVATE = "alice-secret-project"
"""No route of its own: the default route (limit 1 per model) takes it."""
FIXED_LIMIT = {"min_concurrency": None, "limits_now": []}
"""What `status --json` shows of a route without an adaptive limit."""


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
                {"model": ROUTED, "upstream": host_port, "concurrency": 2, "in_flight": 2, **FIXED_LIMIT},
                {"model": "*", "upstream": host_port, "concurrency": 1, "in_flight": 1, **FIXED_LIMIT},
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


async def test_status_shows_the_tokens_of_each_batch_and_the_cost_of_priced_ones(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    config = priced_config(tmp_path / "fusillade.toml", upstream, model="priced")
    config.write_text(config.read_text() + f'\n[models.free]\nbase_url = "{upstream.url}"\n')
    database = ("--database-url", "sqlite:///state.db")
    tokens: dict[str, tuple[int, int]] = {}
    for model, count in (("priced", 8), ("free", 5)):
        write_requests(tmp_path / f"{model}.jsonl", count, model=model)
        result = await fusillade("run", f"{model}.jsonl", "--config", str(config), *database, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        tokens[model] = reported_usage(read_lines(tmp_path / f"{model}.output.jsonl"))

    code = await fusillade("status", "--json", "--config", str(config), *database, cwd=tmp_path)
    assert code.returncode == 0, code.stderr
    free, priced = json.loads(code.stdout)["batches"]  # newest first
    for batch in (free, priced):
        input_tokens, output_tokens = tokens[batch["model"]]
        assert batch["usage"] == {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        assert batch["requests_without_usage"] == 0
    assert free["cost"] is None
    input_tokens, output_tokens = tokens["priced"]
    cost = Decimal("0.01") * input_tokens + Decimal("0.03") * output_tokens
    assert cost >= 1  # shown to the cent, exactly
    assert priced["cost"] == {
        "currency": "usd",
        "input": float(Decimal("0.01") * input_tokens),
        "output": float(Decimal("0.03") * output_tokens),
        "total": float(cost),
    }

    table = await fusillade("status", "--config", str(config), *database, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if "batch" in line and "tokens" in line)
    assert cells(header)[6:] == ["tokens", "cost", "created"]
    rows = {cells(line)[0]: cells(line) for line in table.stdout.splitlines() if "batch_" in line}
    assert rows[priced["id"]][6:8] == [f"{sum(tokens['priced']):,}", f"${cost:,.2f}"]
    assert rows[free["id"]][6:8] == [f"{sum(tokens['free']):,}", "-"]  # a model without pricing: no cost


def cells(line: str) -> list[str]:
    """The cells of a row of a table printed by rich."""
    return [cell.strip() for cell in line.replace("┃", "│").split("│")[1:-1]]
