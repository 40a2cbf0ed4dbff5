"""Daemons as real processes: killed with SIGKILL mid-batch, stopped with SIGTERM. The upstream (in the test
process) records every call it received, so duplicates can be counted exactly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from fusillade.domain import models, states
from fusillade.mock_upstream import Behaviour, MockUpstream, UniformLatency
from fusillade.storage import base
from tests.integration.test_daemon import finished
from tests.support import backends, factories, polling

ROOT = Path(__file__).resolve().parents[2]


def database_url(backend: backends.Backend) -> str:
    return backend.location if backend.is_postgres else f"sqlite:///{backend.location}"


@contextlib.asynccontextmanager
async def daemon_process(
    backend: backends.Backend, upstream: MockUpstream
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.daemon_process",
        "--database",
        database_url(backend),
        "--upstream",
        upstream.url,
        "--model",
        "model-a=16",
        cwd=ROOT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_killed_daemon_loses_nothing_and_resends_at_most_what_it_had_in_flight(
    backend: backends.Backend, storage: base.Storage, upstream: MockUpstream
) -> None:
    upstream.behaviour = Behaviour(latency=UniformLatency(0.02, 0.06))
    batch = await factories.create_batch(storage, count=600)

    async with daemon_process(backend, upstream) as first:
        await polling.until(lambda: upstream.stats.requests_total >= 150, message="work under way")
        first.kill()
        await first.wait()
    held = (await storage.get_batch(batch.id, owner=models.ALL_OWNERS)).counts.in_progress
    assert held > 0, "the kill came when nothing was in flight: the test proves nothing"

    async with daemon_process(backend, upstream) as second:
        done = await finished(storage, batch, within=60)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 20) == 0

    assert done.status == states.BatchStatus.COMPLETED
    output, error = await factories.result_lines(storage, batch)
    assert error == []
    assert Counter(line["custom_id"] for line in output) == {f"req-{n}": 1 for n in range(1, 601)}
    sent_twice = sum(1 for attempts in upstream.stats.attempts_by_custom_id.values() if len(attempts) > 1)
    assert sent_twice <= held, f"{sent_twice} requests were sent twice, but only {held} were in flight"
    statuses = {daemon.status for daemon in await storage.list_daemons()}
    assert statuses == {states.DaemonStatus.DEAD}
