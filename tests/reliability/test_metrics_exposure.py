"""`/metrics` is safe to expose, against `fusillade serve` as a process with a default route (`[models."*"]`):
a tenant's batch with 500 distinct model names (one of them "secret" project names) runs while scrapers read
the metrics; no tenant's string ever appears in them, their size stays that of two models, and with keys only an
admin or the metrics key reads them on the API, while `[server] metrics_address` serves them keyless apart.
`/healthz` stays keyless and fast throughout."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusillade.mock_upstream import Behaviour, HttpError, MockUpstream
from tests.support import polling, security
from tests.support.processes import Processes

pytestmark = pytest.mark.reliability

ADMIN_VARIABLE = "EXPOSURE_ADMIN_KEY"
METRICS_VARIABLE = "EXPOSURE_METRICS_KEY"
SECRET = "alice-secret-project-apollo"
TENANT_MODELS = [SECRET, *(f"tenant-model-{n:03d}-{uuid.uuid4().hex[:8]}" for n in range(499))]
ROUTED = "routed-model"
METRICS_LISTENING = re.compile(r"Metrics on (http://\S+)/metrics")
MAX_METRICS_BYTES = 64 * 1024
"""500 tenant model names once made /metrics 12.7 MB; two labels of each metric take a few tens of KB."""


def batch_input() -> bytes:
    lines = [
        {
            "custom_id": f"{model}-line-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "hello"}]},
        }
        for index, model in enumerate([*TENANT_MODELS, ROUTED, ROUTED])
    ]
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def form(content: bytes) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("purpose", "batch")
    data.add_field("file", content, filename="input.jsonl", content_type="application/octet-stream")
    return data


def samples(text: str) -> list[Any]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def assert_nothing_of_the_tenant(text: str) -> None:
    assert SECRET not in text and "tenant-model" not in text and "alice" not in text
    models = {sample.labels["model"] for sample in samples(text) if "model" in sample.labels}
    assert models <= {ROUTED, "*"}, models
    assert len(text) < MAX_METRICS_BYTES, len(text)


async def test_metrics_show_no_tenant_string_stay_small_and_need_an_admin_or_metrics_key(
    tmp_path: Path,
) -> None:
    environment = {ADMIN_VARIABLE: f"fus_admin-{uuid.uuid4().hex}", METRICS_VARIABLE: f"m-{uuid.uuid4().hex}"}
    behaviour = Behaviour(faults_by_custom_id={f"{SECRET}-line-0": [HttpError(503)]})
    async with (
        MockUpstream(behaviour) as upstream,
        Processes(tmp_path, environment=environment) as fleet,
        aiohttp.ClientSession() as http,
    ):
        config = tmp_path / "fusillade.toml"
        config.write_text(
            f"""
database_url = "sqlite:///{tmp_path / "fusillade.db"}"

[server]
metrics_address = "127.0.0.1:0"

[auth]
admin_key_env = "{ADMIN_VARIABLE}"
metrics_key_env = "{METRICS_VARIABLE}"

[daemon]
idle_poll_interval = "100ms"

[daemon.retry]
base_delay = "10ms"
max_delay = "50ms"

[models."{ROUTED}"]
base_url = "{upstream.url}"

[models."*"]
base_url = "{upstream.url}"
concurrency = 4
"""
        )
        (serve, url), (alice_key, _) = await security.together(
            fleet.serve("--config", str(config)), security.create_key(fleet, config, "alice")
        )
        metrics_url = (await serve.logged(METRICS_LISTENING, message="the metrics listener")).group(1)

        async def call(target: str, key: str | None = None) -> tuple[int, bytes]:
            headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
            async with http.get(target, headers=headers) as response:
                return response.status, await response.read()

        async with http.post(
            f"{url}/v1/files", data=form(batch_input()), headers={"Authorization": f"Bearer {alice_key}"}
        ) as response:
            assert response.status == 200, await response.text()
            file_id = (await response.json())["id"]
        payload = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        async with http.post(
            f"{url}/v1/batches", json=payload, headers={"Authorization": f"Bearer {alice_key}"}
        ) as response:
            assert response.status == 200, await response.text()
            batch_id = (await response.json())["id"]

        # Four scrapers with the admin key and one without, while the batch runs; /healthz timed meanwhile.
        done = asyncio.Event()
        scrapes: list[str] = []

        async def scrape(key: str | None) -> None:
            while not done.is_set():
                status, body = await call(f"{url}/metrics", key)
                if key is None:
                    assert status == 401
                else:
                    assert status == 200
                    scrapes.append(body.decode())

        async def finished() -> bool:
            status, body = await call(f"{url}/v1/batches/{batch_id}", alice_key)
            assert status == 200
            batch = orjson.loads(body)
            return bool(batch["status"] == "completed")

        async def probe() -> list[float]:
            times = []
            while not done.is_set():
                started = time.monotonic()
                assert (await call(f"{url}/healthz"))[0] == 200
                times.append(time.monotonic() - started)
                await asyncio.sleep(0.02)
            return times

        scrapers = [asyncio.create_task(scrape(key)) for key in (*[environment[ADMIN_VARIABLE]] * 4, None)]
        probing = asyncio.create_task(probe())
        try:
            await polling.until(finished, within=40, interval=0.1, message="the batch to complete")
        finally:
            done.set()
            await asyncio.gather(*scrapers)
            healthz = await probing

        assert scrapes, "no scrape during the batch"
        for text in scrapes:
            assert_nothing_of_the_tenant(text)
        print(f"{len(scrapes)} scrapes during the batch; /healthz median {statistics.median(healthz):.4f} s")
        assert statistics.median(healthz) < 0.25, healthz

        status, body = await call(f"{url}/metrics", environment[ADMIN_VARIABLE])
        assert status == 200
        text = body.decode()
        assert_nothing_of_the_tenant(text)
        values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for sample in samples(text)}
        finished_total = "fusillade_requests_finished_total"
        assert values[(finished_total, (("model", "*"), ("outcome", "completed")))] == len(TENANT_MODELS)
        assert values[(finished_total, (("model", ROUTED), ("outcome", "completed")))] == 2
        assert values[("fusillade_request_retries_total", (("code", "http_503"), ("model", "*")))] == 1
        print(f"/metrics: {len(text)} bytes, {len(values)} samples")

        for key, expected in ((None, 401), ("not-a-key", 401), (alice_key, 403)):
            status, body = await call(f"{url}/metrics", key)
            assert status == expected and b"# HELP" not in body, (key, status)
        status, body = await call(f"{url}/metrics", environment[METRICS_VARIABLE])
        assert status == 200 and b"fusillade_requests_finished_total" in body
        assert (await call(f"{url}/v1/batches", environment[METRICS_VARIABLE]))[0] == 401

        status, body = await call(f"{metrics_url}/metrics")
        assert status == 200 and b"fusillade_requests_finished_total" in body
        assert_nothing_of_the_tenant(body.decode())
        assert (await call(f"{metrics_url}/v1/batches", alice_key))[0] == 404
        assert (await call(f"{url}/healthz"))[0] == 200
