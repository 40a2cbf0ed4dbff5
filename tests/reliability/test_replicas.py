"""Scenario 2, replicas on PostgreSQL: three `fusillade daemon` processes and one `fusillade api`, started from one
configuration file as docs/operations.md says, share one database and three models with limits 8, 16 and 32.
A batch is uploaded through the API with the official `openai` SDK; one daemon is killed with SIGKILL while it
has requests in flight, once a third of the batch is done.

What is checked, on the fake upstream's own records and on the database:
- the upstream never has more requests of a model in flight than the model's limit (the limit is global);
- every custom id is in the output file exactly once (nothing lost, nothing completed twice), and the only
  requests the upstream received more than once are those the killed daemon had in flight;
- all three daemons finished requests; the killed daemon's in-flight requests went back to pending once its
  heartbeat was older than `stale_after`, and the survivors finished them;
- the survivors and the API were never fenced or crashed: they stop with exit code 0.

Sizes: 20,000 requests in CI, 50,000 (the most one upload may hold by default) with `pytest --long`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from openai import AsyncOpenAI

from fusillade.mock_upstream import Behaviour, MockUpstream, UniformLatency
from tests.reliability.conftest import Scale
from tests.reliability.deployment import Deployment, config_text
from tests.support import polling
from tests.support.processes import Process

pytestmark = [pytest.mark.reliability, pytest.mark.postgres]

LIMITS = {"model-8": 8, "model-16": 16, "model-32": 32}
MODEL_OF_LINE = [model for model, limit in LIMITS.items() for _ in range(limit // 8)]
"""Line i goes to `MODEL_OF_LINE[i % 7]`: each model gets a share of the lines in proportion to its limit, so
that the three finish together."""
HEARTBEAT_S = 0.5
STALE_AFTER_S = 3.0
DAEMON_SETTINGS: dict[str, str | int] = {
    "heartbeat_interval": f"{int(HEARTBEAT_S * 1000)}ms",
    "stale_after": f"{int(STALE_AFTER_S * 1000)}ms",
    "maintenance_interval": "200ms",
    "idle_poll_interval": "100ms",
    "shutdown_grace": "5s",
}
UPSTREAM_LATENCY = UniformLatency(0.005, 0.02)
KILL_AT = 0.3
"""The victim is killed once this share of the batch is finished."""
_RECLAIMED = re.compile(r"Reclaimed (\d+) requests of dead or silent daemons")


@dataclass
class Setup:
    deployment: Deployment
    upstream: MockUpstream
    api_url: str
    daemons: list[Process]
    database: asyncpg.Connection


@pytest.fixture
async def setup(tmp_path: Path, postgres_url: str) -> AsyncIterator[Setup]:
    """The fake upstream (in this process, for its exact records), the API and three daemons on a fresh
    database; every process is stopped at the end."""
    async with MockUpstream(Behaviour(latency=UPSTREAM_LATENCY)) as upstream:
        config = tmp_path / "fusillade.toml"
        config.write_text(config_text(postgres_url, upstream.url, LIMITS, DAEMON_SETTINGS))
        deployment = Deployment(tmp_path, config)
        database = await asyncpg.connect(postgres_url)
        try:
            with deployment.logs_on_failure():
                daemons = [deployment.start_daemon(f"daemon-{number}") for number in (1, 2, 3)]
                (_, api_url), _ = await asyncio.gather(
                    deployment.start_api(), asyncio.gather(*(daemon.registered() for daemon in daemons))
                )
            yield Setup(deployment, upstream, api_url, daemons, database)
        finally:
            await deployment.stop()
            await database.close()


def request_lines(count: int) -> bytes:
    lines = (
        {
            "custom_id": f"r{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL_OF_LINE[index % len(MODEL_OF_LINE)],
                "messages": [{"role": "user", "content": f"hello {index}"}],
            },
        }
        for index in range(count)
    )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def finished_by_daemon(database: asyncpg.Connection) -> Counter[str]:
    """Finished requests (completed or failed) per daemon id."""
    rows = await database.fetch(
        "SELECT daemon_id::text AS daemon, count(*) AS n FROM requests "
        "WHERE state IN ('completed', 'failed') GROUP BY daemon_id"
    )
    return Counter({row["daemon"]: row["n"] for row in rows})


async def in_flight_of(database: asyncpg.Connection, daemon_id: str) -> set[str]:
    rows = await database.fetch(
        "SELECT custom_id FROM requests WHERE state = 'in_flight' AND daemon_id = $1::uuid", daemon_id
    )
    return {row["custom_id"] for row in rows}


@pytest.mark.timeout(240)
async def test_three_daemons_share_global_limits_and_reclaim_a_killed_one(setup: Setup, scale: Scale) -> None:
    count = scale(20_000, 50_000)
    deployment, upstream, database = setup.deployment, setup.upstream, setup.database
    victim, *survivors = setup.daemons
    assert victim.daemon_id is not None
    report: dict[str, object] = {"requests": count}

    with deployment.logs_on_failure():
        async with AsyncOpenAI(base_url=setup.api_url + "/v1", api_key="local", max_retries=0) as sdk:
            started = time.monotonic()
            uploaded = await sdk.files.create(file=("requests.jsonl", request_lines(count)), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            created = time.monotonic()
            report["upload_and_create_s"] = round(created - started, 2)

            # Kill the victim mid-run, once every daemon has finished requests, at a moment it has requests in
            # flight: it is frozen (SIGSTOP) to look, and killed frozen, or let go to look again later.
            async def victim_frozen_holding_requests() -> bool:
                for replica in setup.daemons:
                    replica.check_running()
                done = await finished_by_daemon(database)
                if done.total() < KILL_AT * count or not all(done[r.daemon_id or ""] for r in setup.daemons):
                    return False
                victim.pause()
                if await in_flight_of(database, victim.daemon_id or ""):
                    return True
                victim.resume()
                return False

            await polling.until(
                victim_frozen_holding_requests, within=120, interval=0.1, message="every daemon to finish work"
            )
            await victim.kill()
            killed_at = time.monotonic()
            # Until the reclaim, the victim's requests stay in flight in its name: watch them go. (A commit it
            # sent just before it froze may still land: what it finishes after this is among `held`.)
            held = await in_flight_of(database, victim.daemon_id)
            held_at_kill, ever_held = len(held), set(held)
            done_by_victim_before = (await finished_by_daemon(database))[victim.daemon_id]
            last_held = held
            while held:
                assert time.monotonic() - killed_at < STALE_AFTER_S + 60, (
                    "the victim's requests were not reclaimed"
                )
                last_held = held
                await asyncio.sleep(0.02)
                held = await in_flight_of(database, victim.daemon_id)
                ever_held |= held
            reclaimed_after = time.monotonic() - killed_at
            assert last_held, "the victim had nothing in flight when it was killed"
            # Declared dead by a survivor, and not before its last heartbeat was `stale_after` old.
            row = await database.fetchrow(
                "SELECT status, extract(epoch FROM stopped_at - last_heartbeat)::float8 AS silent_for "
                "FROM daemons WHERE id = $1::uuid",
                victim.daemon_id,
            )
            assert row is not None
            status, silent_for = row["status"], row["silent_for"]
            assert status == "dead"
            assert silent_for >= STALE_AFTER_S, silent_for

            async def batch_finished() -> bool:
                nonlocal batch
                for replica in survivors:
                    replica.check_running()
                batch = await sdk.batches.retrieve(batch.id)
                return batch.status in ("completed", "failed", "expired", "cancelled")

            await polling.until(batch_finished, within=180, interval=0.2, message="the batch to finish")
            report["run_s"] = round(time.monotonic() - started, 2)
            report["requests_per_s"] = round(count / (time.monotonic() - created), 0)
            assert batch.status == "completed"
            assert batch.request_counts is not None
            assert (batch.request_counts.completed, batch.request_counts.failed) == (count, 0)
            assert batch.output_file_id is not None
            output = (await sdk.files.content(batch.output_file_id)).text.splitlines()
            errors = (
                (await sdk.files.content(batch.error_file_id)).text.splitlines() if batch.error_file_id else []
            )

        # Each custom id exactly once in output + errors: nothing lost, nothing completed twice.
        assert len(output) + len(errors) == count
        lines = Counter(json.loads(line)["custom_id"] for line in output + errors)
        assert lines == {f"r{index}": 1 for index in range(count)}

        # The upstream's own records: the limits held across the three daemons; every request arrived, and
        # only the requests the victim held were sent again.
        stats = upstream.stats
        for model, limit in LIMITS.items():
            assert 0 < stats.max_in_flight_by_model[model] <= limit, (model, stats.max_in_flight_by_model)
        attempts = {custom_id: len(arrivals) for custom_id, arrivals in stats.attempts_by_custom_id.items()}
        assert attempts.keys() == lines.keys()
        resent = {custom_id for custom_id, number in attempts.items() if number > 1}
        assert resent <= ever_held, f"sent twice but not held by the killed daemon: {sorted(resent - ever_held)}"
        assert max(attempts.values()) <= 2

        # The database: all three daemons finished requests; the survivors finished what the victim held.
        done = await finished_by_daemon(database)
        assert done.total() == count
        assert done_by_victim_before > 0
        assert done[victim.daemon_id] <= done_by_victim_before + len(ever_held - last_held)
        for replica in survivors:
            assert done[replica.daemon_id or ""] > 0, (replica.name, done)
        finishers = await database.fetch(
            "SELECT daemon_id::text AS daemon FROM requests WHERE custom_id = ANY($1::text[])", sorted(last_held)
        )
        assert {row["daemon"] for row in finishers} <= {replica.daemon_id for replica in survivors}
        reclaimed_logged = sum(
            int(found) for replica in survivors for found in _RECLAIMED.findall(replica.log_text())
        )
        assert reclaimed_logged >= len(last_held)

        codes = await deployment.stop()
        assert codes == {"daemon-1": -9, "daemon-2": 0, "daemon-3": 0, "api": 0}, codes

    report |= {
        "upstream_max_in_flight": dict(stats.max_in_flight_by_model),
        "upstream_requests": stats.requests_total,
        "sent_twice": len(resent),
        "victim_in_flight_at_kill": held_at_kill,
        "reclaimed": len(last_held),
        "reclaimed_after_s": round(reclaimed_after, 2),
        "declared_dead_after_silence_s": round(silent_for, 2),
        "finished_by_daemon": {replica.name: done[replica.daemon_id or ""] for replica in setup.daemons},
        "responses_by_status": dict(stats.responses_by_status),
    }
    print(f"\nreplicas scenario: {json.dumps(report)}")
