"""Another process holds the SQLite write lock for `LOCK_S` under `fusillade serve`'s running batch (a backup
tool, a script with an open transaction): longer than `daemon.stale_after`, so the daemon's heartbeats miss it.

Checked: `serve` stays up with the same process id (no exit because its daemon was declared dead: the daemon
registers again); `/healthz` answers throughout; reads of the batch answer (WAL readers never wait for a
writer); an API write answers 503 with `Retry-After` within `WRITE_ANSWER_S`, never hangs; once the lock goes,
the batch completes with every custom_id exactly once in its output, and the requests sent twice are at most
those the daemon had in flight (its route's limit). `pytest -s` prints the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from fusillade.mock_upstream import Behaviour, MockUpstream, UniformLatency
from tests.reliability.conftest import Scale
from tests.reliability.mixed_load import request_lines
from tests.support import polling
from tests.support.processes import Processes

pytestmark = pytest.mark.reliability

LOCK_S = 60.0
"""How long the other process holds the write lock (the issue's figure)."""
STALE_AFTER_S = 30
"""`daemon.stale_after`, the default: shorter than the lock."""
CONCURRENCY = 8
WRITE_ANSWER_S = 40.0
"""The longest an API write may take to answer 503 while the database is locked (a turn the daemon holds while
it polls for the lock, 10 s; the write's own busy wait, 10 s; a margin for a busy machine)."""
KEY = "fus_lock-test-admin-key-0123456789abcdef"


def config(database: Path, upstream: str) -> str:
    return f"""database_url = "sqlite:///{database}"

[auth]
admin_key_env = "LOCK_TEST_ADMIN_KEY"

[daemon]
stale_after = "{STALE_AFTER_S}s"
heartbeat_interval = "2s"
maintenance_interval = "500ms"
idle_poll_interval = "200ms"
database_backoff_max = "1s"
shutdown_grace = "5s"

[models."model-a"]
base_url = "{upstream}"
concurrency = {CONCURRENCY}
"""


@pytest.mark.timeout(300)
async def test_serve_survives_a_write_lock_held_longer_than_stale_after(tmp_path: Path, scale: Scale) -> None:
    total = scale(2_000, 10_000)
    headers = {"Authorization": f"Bearer {KEY}"}
    database = tmp_path / "lock.db"
    async with (
        MockUpstream(Behaviour(latency=UniformLatency(0.01, 0.03))) as upstream,
        Processes(tmp_path, environment={"LOCK_TEST_ADMIN_KEY": KEY}) as processes,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WRITE_ANSWER_S + 20)) as http,
    ):
        (tmp_path / "fusillade.toml").write_text(config(database, upstream.url))
        serve, base = await processes.serve("--config", "fusillade.toml")

        async def upload(count: int, prefix: str) -> str:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            content = request_lines(count, model="model-a", prefix=prefix)
            form.add_field("file", io.BytesIO(content), filename=f"{prefix}.jsonl")
            async with http.post(f"{base}/v1/files", data=form, headers=headers) as response:
                assert response.status == 200, await response.text()
                return str((await response.json())["id"])

        async def create(file_id: str) -> tuple[int, dict[str, str], float]:
            document = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            started = time.monotonic()
            async with http.post(f"{base}/v1/batches", json=document, headers=headers) as response:
                body = await response.json()
                return response.status, {**response.headers, **body}, time.monotonic() - started

        async def counts(batch_id: str) -> dict[str, int]:
            async with http.get(f"{base}/v1/batches/{batch_id}", headers=headers) as response:
                assert response.status == 200, await response.text()
                return dict((await response.json())["request_counts"])

        spare = await upload(3, "spare")
        status, created, _ = await create(await upload(total, "lock"))
        assert status == 200, created
        batch = created["id"]
        await polling.until(
            lambda: _finished_at_least(counts, batch, total // 5), within=60, message="a fifth of the batch"
        )

        # Another process takes the write lock and keeps it, while /healthz and a read of the batch are probed
        # every second and one create waits for its answer.
        locker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN IMMEDIATE")
        health: list[tuple[int, float]] = []
        reads: list[float] = []
        unlocked = asyncio.Event()

        async def probe_until_unlocked() -> None:
            while not unlocked.is_set():
                started = time.monotonic()
                async with http.get(f"{base}/healthz") as response:
                    health.append((response.status, time.monotonic() - started))
                started = time.monotonic()
                await counts(batch)
                reads.append(time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(unlocked.wait(), timeout=1.0)

        prober = asyncio.create_task(probe_until_unlocked())
        write_status, write_answer, write_seconds = await create(spare)
        await asyncio.wait({prober}, timeout=LOCK_S - write_seconds)  # the rest of the lock's length
        serve.check_running()
        locker.execute("ROLLBACK")
        locker.close()
        unlocked.set()
        await prober
        released_at = time.monotonic()

        async def done() -> dict[str, int] | None:
            current = await counts(batch)
            return current if current["completed"] + current["failed"] == total else None

        final = await polling.until(done, within=120, message="the batch to finish after the lock")
        completed_after = time.monotonic() - released_at
        serve.check_running()
        async with http.get(f"{base}/v1/batches/{batch}", headers=headers) as response:
            output_id = (await response.json())["output_file_id"]
        async with http.get(f"{base}/v1/files/{output_id}/content", headers=headers) as response:
            output = [json.loads(line) for line in (await response.text()).splitlines()]
        log = serve.log_text()
        codes = await processes.stop()

    assert write_status == 503, write_answer
    assert write_answer.get("Retry-After") or write_answer.get("retry-after"), write_answer
    assert write_seconds < WRITE_ANSWER_S
    assert health and all(status == 200 for status, _ in health), health
    assert max(seconds for _, seconds in health) < 5.0, health
    assert reads and max(reads) < 5.0, reads
    assert final["completed"] == total
    assert Counter(line["custom_id"] for line in output) == {f"lock-{n}": 1 for n in range(total)}
    sent_twice = [custom_id for custom_id, times in upstream.stats.attempts_by_custom_id.items() if len(times) > 1]
    assert len(sent_twice) <= CONCURRENCY, sent_twice
    assert codes["serve"] == 0, log[-3000:]
    print(
        f"\nSQLite write lock held {LOCK_S:.0f} s: /healthz {len(health)} probes, worst "
        f"{max(s for _, s in health) * 1000:.0f} ms; batch reads worst {max(reads) * 1000:.0f} ms; a create "
        f"answered {write_status} in {write_seconds:.1f} s; the daemon registered again: "
        f"{'Registering again' in log}; batch done {completed_after:.1f} s after the lock; "
        f"{len(sent_twice)} requests sent twice"
    )


async def _finished_at_least(counts: Callable[[str], Awaitable[dict[str, int]]], batch: str, count: int) -> bool:
    current = await counts(batch)
    return current["completed"] + current["failed"] >= count
