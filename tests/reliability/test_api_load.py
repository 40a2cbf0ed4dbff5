"""The daemon's pace under API load: a batch runs against a 50 ms upstream while API clients upload,
create batches, read, list and download (`mixed_load`). The batch's completion rate is measured idle, then under
the load, for `fusillade serve` on SQLite and for `fusillade api` + two `fusillade daemon` on PostgreSQL.

Checked: the rate under load keeps at least `FLOOR` of the idle rate (the goals, 70% on SQLite and 90% on
PostgreSQL, are recorded in docs/reliability.md from quiet runs: this machine's other work moves the figure),
batch reads answer within `READ_P99` at the 99th percentile, no API call answers 5xx, and the batch was still
running when the measurement ended (else the rate would be the batch's end, not its pace).

Sizes: 12,000 requests, 6 clients for 8 s in CI; 40,000 requests, 12 clients for 30 s with `pytest --long`.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.reliability.conftest import Scale
from tests.reliability.mixed_load import OPERATIONS, CompletionRate, mixed_load, request_lines
from tests.support import polling
from tests.support.processes import Processes

pytestmark = [pytest.mark.reliability, pytest.mark.solo, pytest.mark.timeout(600)]

FLOOR = 0.4
"""The least share of the idle completion rate the batch must keep under load (in CI): a guard against the
starvation issue 13 fixed (35% then on a machine where serve now keeps 71%), below the spread of the fixed code on
the slowest machine kind CI runs on (47-60% on SQLite, docs/reliability.md)."""
READ_P99 = 2.0
"""Seconds: the most the 99th percentile of batch reads may take under the load (the goal is 1 s)."""
UPSTREAM_LATENCY_MS = "50"
BENCH_CONCURRENCY = 32
LOAD_MODEL = "load"
"""The model of the batches the clients create: a small limit, so that they add little daemon work."""


@dataclass
class Measured:
    idle: float
    loaded: float
    summary: str
    read_p99: float

    @property
    def share(self) -> float:
        return self.loaded / self.idle


def config(database_url: str, upstream: str) -> str:
    return f"""database_url = "{database_url}"

[auth]
admin_key_env = "LOAD_TEST_ADMIN_KEY"

[daemon]
idle_poll_interval = "100ms"

[models."bench"]
base_url = "{upstream}"
concurrency = {BENCH_CONCURRENCY}

[models."{LOAD_MODEL}"]
base_url = "{upstream}"
concurrency = 2
"""


ADMIN_KEY = "fus_load-test-admin-key-0123456789abcdef"


async def measure(base: str, scale: Scale) -> Measured:
    total = scale(12_000, 40_000)
    clients, seconds = scale(6, 12), scale(8.0, 30.0)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        # A stream: aiohttp warns about (and pytest fails on) bytes bodies over 1 MiB.
        form.add_field(
            "file", io.BytesIO(request_lines(total, model="bench", prefix="bench")), filename="bench.jsonl"
        )
        async with http.post(f"{base}/v1/files", data=form, headers=headers) as response:
            assert response.status == 200, await response.text()
            file_id = orjson.loads(await response.read())["id"]
        document = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        async with http.post(f"{base}/v1/batches", json=document, headers=headers) as response:
            assert response.status == 200, await response.text()
            batch = orjson.loads(await response.read())["id"]

        rate = CompletionRate(http, base, ADMIN_KEY, batch)
        await polling.until(lambda: _at_least(rate, 300), within=60, message="the batch to get going")
        idle = await _idle_rate(rate, seconds)

        await rate.start()
        report = await mixed_load(
            base, ADMIN_KEY, watched=batch, clients=clients, seconds=seconds, upload_lines=1000, model=LOAD_MODEL
        )
        loaded = await rate.stop()
        assert await rate.finished() < total, "the batch ended during the measurement: make it bigger"
    assert sum(report.server_errors.values()) == 0, report.server_errors
    assert all(report.count(operation) > 0 for operation in OPERATIONS), report.summary()
    return Measured(idle, loaded, report.summary(), read_p99=report.percentile("read", 0.99))


async def _at_least(rate: CompletionRate, count: int) -> bool:
    return await rate.finished() >= count


async def _idle_rate(rate: CompletionRate, seconds: float) -> float:
    """The rate over a window of `seconds` without load (a measurement window, not a wait for a condition)."""
    await rate.start()
    await asyncio.sleep(seconds)
    return await rate.stop()


def report_figures(title: str, measured: Measured) -> None:
    print(
        f"\n{title}: idle {measured.idle:,.0f} requests/s, under load {measured.loaded:,.0f} requests/s "
        f"({measured.share:.0%}); API: {measured.summary}"
    )


async def test_serve_on_sqlite_keeps_its_pace_under_api_load(tmp_path: Path, scale: Scale) -> None:
    async with Processes(tmp_path, environment={"LOAD_TEST_ADMIN_KEY": ADMIN_KEY}) as processes:
        upstream = await processes.mock_upstream("--latency-ms", UPSTREAM_LATENCY_MS, "--no-track-custom-ids")
        (tmp_path / "fusillade.toml").write_text(config(f"sqlite:///{tmp_path}/load.db", upstream))
        _, base = await processes.serve("--config", "fusillade.toml")
        measured = await measure(base, scale)
    report_figures("serve on SQLite", measured)
    assert measured.share >= FLOOR
    assert measured.read_p99 < READ_P99


@pytest.mark.postgres
async def test_api_and_two_daemons_on_postgres_keep_their_pace_under_api_load(
    tmp_path: Path, scale: Scale, postgres_url: str
) -> None:
    async with Processes(
        tmp_path, environment={"LOAD_TEST_ADMIN_KEY": ADMIN_KEY}, stop_together=True
    ) as processes:
        upstream = await processes.mock_upstream("--latency-ms", UPSTREAM_LATENCY_MS, "--no-track-custom-ids")
        (tmp_path / "fusillade.toml").write_text(config(postgres_url, upstream))
        daemons = [processes.start(f"daemon-{n}", "daemon", "--config", "fusillade.toml") for n in (1, 2)]
        _, base = await processes.serve("--config", "fusillade.toml", command="api")
        for daemon in daemons:
            await daemon.registered()
        measured = await measure(base, scale)
    report_figures("api + 2 daemons on PostgreSQL", measured)
    assert measured.share >= FLOOR
    assert measured.read_p99 < READ_P99
