"""`fusillade serve` as a user starts it: a subprocess on a free port, driven by the official `openai` SDK; API
keys made with `fusillade keys`; the refusal to listen publicly without keys; a configuration reload; and
`fusillade api` + `fusillade daemon` as two processes on one database."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from fusillade.mock_upstream import Behaviour, MockUpstream
from tests.support import polling, postgres
from tests.support.processes import Processes


def request_lines(count: int, *, model: str = "demo") -> bytes:
    lines = (
        {
            "custom_id": f"request-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"hello {index}"}]},
        }
        for index in range(count)
    )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def run_batch(sdk: AsyncOpenAI, content: bytes) -> list[str]:
    """Upload, create, poll to the end; the custom ids of the output file."""
    uploaded = await sdk.files.create(file=("requests.jsonl", content), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def finished() -> bool:
        nonlocal batch
        batch = await sdk.batches.retrieve(batch.id)
        return batch.status in ("completed", "failed", "expired", "cancelled")

    await polling.until(finished, within=20, interval=0.05, message="the batch to finish")
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    output = await sdk.files.content(batch.output_file_id)
    return [json.loads(line)["custom_id"] for line in output.text.splitlines()]


async def test_serve_with_the_mock_upstream_runs_a_batch_for_the_openai_sdk(tmp_path: Path) -> None:
    async with Processes(tmp_path) as processes:
        server, url = await processes.serve("--mock-upstream", "--database-url", "sqlite:///demo.db")
        log = server.log_text()
        assert "No API keys: serving one local owner" in log
        assert "fusillade keys create" in log

        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="anything, no keys exist yet") as sdk:
            custom_ids = await run_batch(sdk, request_lines(10))

        assert sorted(custom_ids) == sorted(f"request-{index}" for index in range(10))
        assert await server.stop() == 0
        log = server.log_text()
        assert log.index("Stopping: no new HTTP connections") < log.index("stopped.")  # the daemon stops after
        assert (tmp_path / "demo.db").exists()


async def test_keys_made_with_the_cli_guard_the_api_and_routes_reload_live(tmp_path: Path) -> None:
    async with Processes(tmp_path) as processes:
        upstream = await processes.mock_upstream()
        config = tmp_path / "fusillade.toml"
        routes = f'[models.demo]\nbase_url = "{upstream}"\nconcurrency = 4\n'
        config.write_text(f'database_url = "sqlite:///{tmp_path / "f.db"}"\n\n{routes}')
        code, stdout, stderr = await processes.cli("keys", "create", "--owner", "alice", "--config", str(config))
        assert code == 0, stderr
        key = stdout.splitlines()[-1]
        assert key.startswith("fus_")
        assert "cannot be shown again" in stderr

        server, url = await processes.serve("--config", str(config))
        assert "No API keys" not in server.log_text()

        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="fus_not-a-key", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError):
                await stranger.files.list()
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as alice:
            assert len(await run_batch(alice, request_lines(5))) == 5

            with pytest.raises(openai.BadRequestError, match="no route"):
                await alice.files.create(file=("late.jsonl", request_lines(1, model="late")), purpose="batch")
            config.write_text(config.read_text() + f'\n[models.late]\nbase_url = "{upstream}"\n')
            server.popen.send_signal(signal.SIGHUP)

            async def late_model_served() -> list[str] | None:
                try:
                    return await run_batch(alice, request_lines(2, model="late"))
                except openai.BadRequestError:
                    return None

            assert len(await polling.until(late_model_served, within=10, message="the reloaded route")) == 2

            code, stdout, stderr = await processes.cli("keys", "list", "--json", "--config", str(config))
            assert code == 0, stderr
            [listed] = json.loads(stdout)
            assert (listed["owner"], listed["revoked_at"]) == ("alice", None)
            assert key.startswith(listed["prefix"])
            code, _, stderr = await processes.cli("keys", "revoke", listed["id"], "--config", str(config))
            assert code == 0, stderr

            with pytest.raises(openai.AuthenticationError):
                await alice.files.list()
        assert await server.stop() == 0


async def test_serve_refuses_a_public_address_without_api_keys(tmp_path: Path) -> None:
    code, _, stderr = await Processes(tmp_path).cli(
        "serve", "--host", "0.0.0.0", "--port", "0", "--database-url", "sqlite:///f.db"
    )

    assert code == 2
    assert "Refusing to listen on 0.0.0.0: no API key exists" in stderr
    assert "fusillade keys create --owner NAME" in stderr
    assert "--host 127.0.0.1" in stderr


async def test_api_and_daemon_as_separate_processes_share_the_database(tmp_path: Path) -> None:
    async with MockUpstream(Behaviour()) as upstream, Processes(tmp_path) as processes:
        config = tmp_path / "fusillade.toml"
        config.write_text(
            f'database_url = "sqlite:///{tmp_path / "shared.db"}"\n\n'
            f'[daemon]\nidle_poll_interval = "100ms"\n\n[models.demo]\nbase_url = "{upstream.url}"\n'
        )
        api, url = await processes.serve("--config", str(config), command="api")
        metrics_port = postgres.free_port()  # for the daemon's metrics
        daemon = processes.start("daemon", "daemon", "--config", str(config), "--metrics-port", str(metrics_port))
        try:
            async with AsyncOpenAI(base_url=f"{url}/v1", api_key="local") as sdk:
                assert len(await run_batch(sdk, request_lines(6))) == 6
                assert [model.id async for model in sdk.models.list()] == ["demo"]  # the API process's routes
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
            ):
                metrics = await response.text()
            assert 'fusillade_requests_finished_total{model="demo",outcome="completed"} 6.0' in metrics
            assert "API only" in api.log_text()
        finally:
            assert await daemon.stop() == 0
        assert await api.stop() == 0
    assert upstream.stats.requests_total == 6
