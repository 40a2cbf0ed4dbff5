"""PostgreSQL goes away under a running batch: a restart (scenario 3) and a silent network loss (scenario 5).

Both run the deployment of docs/operations.md: `fusillade migrate`, then one `fusillade daemon` and one
`fusillade api` process started from a TOML file written by the test, the fake upstream in the test process
(it records every attempt of every custom_id). The batch is uploaded and followed through the API; its output and
error files are read back through the API at the end. Nothing restarts the two processes: they must come back
on their own, with the same process ids.

- Restart: a throwaway cluster (`throwaway_postgres`) is stopped with `pg_ctl stop -m immediate` (a crash of
  PostgreSQL alone) a quarter of the way through the batch, kept down for `OUTAGE_S`, and started again on the
  same port. While it is down, `/readyz` and the API's requests answer 503 at once, never hang.
- Silent loss: the daemon and the API reach PostgreSQL through `relay.BlackHoleRelay`, which stops forwarding
  without closing anything (no FIN, no RST), at the moment one connection is inside a transaction. With
  `database_timeout = "2s"`, the daemon must count database errors and `/readyz` must answer 503 within that
  timeout plus a margin for a busy machine; once the relay forwards new connections again, the batch completes.
  The connections caught by the black hole stay open at the server, as after a real cut: the transaction left
  open must be ended by the server (`idle_in_transaction_session_timeout`), not hold its locks for hours.

In both: every custom_id once in output + errors, none missing; requests sent twice (and requests sent while the
database was away) at most what the daemon can hold, its concurrency limit. `pytest -s` prints the figures of
each run for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusillade.mock_upstream import Behaviour, MockUpstream, UniformLatency
from tests.reliability.conftest import Scale
from tests.reliability.deployment import Deployment
from tests.reliability.relay import BlackHoleRelay
from tests.reliability.throwaway_postgres import ClusterError, ThrowawayCluster
from tests.support import polling, postgres
from tests.support.processes import START_WITHIN, Process

pytestmark = [pytest.mark.reliability, pytest.mark.postgres]

MODEL = "model-a"
CONCURRENCY = 16
OUTAGE_S = 10.0
"""How long PostgreSQL stays stopped in the restart scenario (the issue's figure)."""
DATABASE_TIMEOUT_S = 2.0
"""`database_timeout` of the silent-loss scenario: the daemon must notice a silent database within this."""
NOTICE_MARGIN_S = 8.0
"""Allowance on top of a timeout for a busy 2-core machine (a poll interval, a heartbeat, scheduling)."""
PROBE_TIMEOUT_S = 15.0
"""An API answer slower than this during an outage is a hang, and fails the test."""


# --------------------------------------------------------------------------------------------- processes


async def start_api(fleet: Deployment, http: aiohttp.ClientSession) -> tuple[Process, str]:
    """`fusillade api`; the process and its URL once `/readyz` answers 200 (each probe a `probe`: a hang fails)."""
    return await fleet.start_api(check=lambda readyz: probe_ok(http, readyz))


async def start_daemon(fleet: Deployment, http: aiohttp.ClientSession) -> tuple[Process, str]:
    """`fusillade daemon --metrics-port P`; the process and its metrics URL once it registered."""
    metrics = f"http://127.0.0.1:{postgres.free_port()}/metrics"
    daemon = fleet.start_daemon("daemon", "--metrics-port", str(urlsplit(metrics).port))
    await daemon.registered()

    async def serving_metrics() -> bool:
        daemon.check_running()
        return await database_errors(http, metrics) is not None

    await polling.until(serving_metrics, within=START_WITHIN, message="the daemon's metrics")
    return daemon, metrics


def write_config(directory: Path, database_url: str, upstream: str, **top_level: str) -> Path:
    lines = [f'database_url = "{database_url}"']
    lines += [f'{key} = "{value}"' for key, value in top_level.items()]
    lines += [
        "",
        "[daemon]",
        'heartbeat_interval = "500ms"',
        'stale_after = "30s"',  # longer than the outages: the daemon is never taken for dead
        'maintenance_interval = "200ms"',
        'idle_poll_interval = "200ms"',
        'database_backoff_max = "1s"',  # back at work within a second of the database's return
        'purge_interval = "none"',
        'shutdown_grace = "5s"',
        "",
        f'[models."{MODEL}"]',
        f'base_url = "{upstream}"',
        f"concurrency = {CONCURRENCY}",
    ]
    config = directory / "fusillade.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


# --------------------------------------------------------------------------------------------- HTTP


@dataclass
class Probe:
    status: int
    """0: no answer (connection refused or reset)."""
    seconds: float
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


async def probe(http: aiohttp.ClientSession, url: str, method: str = "GET", **options: Any) -> Probe:
    """One request with a hard limit of `PROBE_TIMEOUT_S`; a slower answer fails the test as a hang."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            async with http.request(method, url, **options) as response:
                text = await response.text()
                body = json.loads(text) if text and response.content_type == "application/json" else text
                return Probe(response.status, time.monotonic() - started, body, dict(response.headers))
    except aiohttp.ClientConnectionError:
        return Probe(0, time.monotonic() - started)
    except TimeoutError:
        raise AssertionError(f"{method} {url} did not answer within {PROBE_TIMEOUT_S} s: a hang") from None


async def database_errors(http: aiohttp.ClientSession, metrics_url: str) -> float | None:
    """`fusillade_database_errors_total` of the daemon, all tasks together; None if it does not answer."""
    try:
        async with http.get(metrics_url) as response:
            text = await response.text()
    except aiohttp.ClientConnectionError:
        return None
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "fusillade_database_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def request_lines(count: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"req-{index}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"hello {index}"}]},
            }
        ).encode()
        + b"\n"
        for index in range(count)
    )


async def create_batch(http: aiohttp.ClientSession, api: str, count: int) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", request_lines(count), filename="requests.jsonl", content_type="application/jsonl")
    uploaded = await probe(http, f"{api}/v1/files", "POST", data=form)
    assert uploaded.status == 200, uploaded
    created = await probe(
        http,
        f"{api}/v1/batches",
        "POST",
        json={
            "input_file_id": uploaded.body["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert created.status == 200, created
    return str(created.body["id"])


async def finished_batch(http: aiohttp.ClientSession, api: str, batch_id: str, *, within: float) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        found = await probe(http, f"{api}/v1/batches/{batch_id}")
        if found.status == 200 and found.body["status"] in ("completed", "failed", "expired", "cancelled"):
            return dict(found.body)
        return None

    batch = await polling.until(done, within=within, interval=0.2, message="the batch to finish")
    assert batch is not None
    return batch


async def result_custom_ids(
    http: aiohttp.ClientSession, api: str, batch: dict[str, Any]
) -> tuple[Counter[str], int]:
    """Custom ids of the output and error files together, and the number of error lines."""
    seen: Counter[str] = Counter()
    errors = 0
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key) is None:
            continue
        content = await probe(http, f"{api}/v1/files/{batch[key]}/content")
        assert content.status == 200, content
        lines = [json.loads(line) for line in str(content.body).splitlines() if line]
        seen.update(line["custom_id"] for line in lines)
        if key == "error_file_id":
            errors = len(lines)
    return seen, errors


def sent_more_than_once(upstream: MockUpstream) -> int:
    return sum(1 for attempts in upstream.stats.attempts_by_custom_id.values() if len(attempts) > 1)


def result_figures(count: int, seen: Counter[str], error_lines: int, duplicates: int) -> dict[str, object]:
    """The figures of a finished batch of `count` requests for `report`: `seen` and `error_lines` from
    `result_custom_ids`, `duplicates` from `sent_more_than_once`."""
    return {
        "output_plus_error_lines": sum(seen.values()),
        "error_lines": error_lines,
        "lost": count - len(seen),
        "duplicated_lines": sum(n - 1 for n in seen.values() if n > 1),
        "sent_more_than_once": duplicates,
    }


def check_results(
    count: int, batch: dict[str, Any], seen: Counter[str], error_lines: int, duplicates: int
) -> None:
    """The batch completed with every custom id once in output + errors and no error line, and no more requests
    were sent twice than the daemon could hold (its concurrency limit)."""
    assert batch["status"] == "completed"
    assert seen == {f"req-{index}": 1 for index in range(count)}, "lost or duplicated lines"
    assert error_lines == 0
    assert duplicates <= CONCURRENCY, f"{duplicates} requests sent twice: more than the daemon held"


def report(title: str, **figures: object) -> None:
    """The figures of a run, for docs/reliability.md (shown with `pytest -s`)."""
    print(f"\n[{title}] " + ", ".join(f"{key}={value}" for key, value in figures.items()))


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def cluster() -> AsyncIterator[ThrowawayCluster]:
    try:
        created = await ThrowawayCluster.create()
        await created.start()
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield created
    finally:
        await created.destroy()


@pytest.fixture
async def fake_upstream() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(Behaviour(latency=UniformLatency(0.01, 0.04))) as server:
        yield server


# --------------------------------------------------------------------------------------------- scenario 3


@pytest.mark.timeout(120)
async def test_a_database_restart_loses_nothing_and_needs_no_restart_of_daemon_or_api(
    tmp_path: Path, cluster: ThrowawayCluster, fake_upstream: MockUpstream, scale: Scale
) -> None:
    count = scale(1000, 6000)
    await postgres.execute_admin(cluster.url(), "CREATE DATABASE fusillade")
    config = write_config(tmp_path, cluster.url("fusillade"), fake_upstream.url, database_timeout="5s")
    async with Deployment(tmp_path, config) as fleet, aiohttp.ClientSession() as http:
        await fleet.migrate()
        (daemon, metrics), (api_process, api) = await asyncio.gather(
            start_daemon(fleet, http), start_api(fleet, http)
        )
        pids = (daemon.pid, api_process.pid)
        batch_id = await create_batch(http, api, count)
        await polling.until(
            lambda: fake_upstream.stats.requests_total >= count // 4,
            within=60,
            message="a quarter of the batch sent",
        )

        in_flight_at_stop = fake_upstream.stats.in_flight
        sent_before = fake_upstream.stats.requests_total
        await cluster.stop("immediate")
        stopped = time.monotonic()

        # The outage: probe the API all along. Every answer is quick; readiness turns 503 and stays so.
        readiness: list[tuple[float, Probe]] = []
        reads: list[Probe] = []
        upload: list[Probe] = []

        async def outage_over() -> bool:
            readiness.append((time.monotonic() - stopped, await probe(http, f"{api}/readyz")))
            reads.append(await probe(http, f"{api}/v1/batches/{batch_id}"))
            if not upload:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", request_lines(3), filename="late.jsonl", content_type="application/jsonl")
                upload.append(await probe(http, f"{api}/v1/files", "POST", data=form))
            return time.monotonic() - stopped >= OUTAGE_S

        await polling.until(outage_over, within=OUTAGE_S + 2 * PROBE_TIMEOUT_S, interval=0.2, message="the outage")
        sent_during_outage = fake_upstream.stats.requests_total - sent_before
        errors_during_outage = await database_errors(http, metrics)

        await cluster.start()
        restarted = time.monotonic()
        await polling.until(
            lambda: probe_ok(http, f"{api}/readyz"), within=30, interval=0.1, message="the API ready again"
        )
        ready_after = time.monotonic() - restarted
        batch = await finished_batch(http, api, batch_id, within=90)
        finished_after = time.monotonic() - restarted
        seen, error_lines = await result_custom_ids(http, api, batch)
        for child in (daemon, api_process):
            child.check_running()
        daemons = await fetch(cluster.url("fusillade"), "SELECT pid, status FROM daemons")

    first_unready = next((at for at, answer in readiness if answer.status == 503), None)
    after_first = [answer.status for at, answer in readiness if first_unready is not None and at >= first_unready]
    duplicates = sent_more_than_once(fake_upstream)
    report(
        "database restart",
        requests=count,
        outage_s=OUTAGE_S,
        upstream_in_flight_at_stop=in_flight_at_stop,
        sent_during_outage=sent_during_outage,
        readyz_503_after_s=f"{first_unready:.2f}" if first_unready is not None else None,
        slowest_api_answer_during_outage_s=f"{max(p.seconds for p in reads + [r for _, r in readiness]):.2f}",
        api_answers_during_outage=dict(Counter(p.status for p in reads)),
        upload_during_outage=upload[0].status,
        ready_again_after_s=f"{ready_after:.2f}",
        batch_finished_after_restart_s=f"{finished_after:.2f}",
        **result_figures(count, seen, error_lines, duplicates),
        database_errors_counted=errors_during_outage,
    )
    assert first_unready is not None and first_unready < 5, f"/readyz did not report the outage: {readiness}"
    assert after_first and set(after_first) == {503}, f"/readyz answered other than 503 while down: {after_first}"
    assert reads and {p.status for p in reads} == {503}, f"API reads during the outage: {reads}"
    assert all(p.body["error"]["code"] == "storage_unavailable" and "Retry-After" in p.headers for p in reads)
    assert upload[0].status == 503, upload
    assert errors_during_outage, "the daemon counted no database error: it did not see the outage"
    # Requests claimed before the stop may still be sent; nothing new is claimed while the database is down.
    assert sent_during_outage <= CONCURRENCY, "the daemon sent more than it could hold while the database was down"
    check_results(count, batch, seen, error_lines, duplicates)
    assert (daemon.pid, api_process.pid) == pids
    assert [(row["pid"], row["status"]) for row in daemons] == [(daemon.pid, "running")]


async def probe_ok(http: aiohttp.ClientSession, url: str) -> bool:
    return (await probe(http, url)).status == 200


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return await connection.fetch(query)
    finally:
        await connection.close()


# --------------------------------------------------------------------------------------------- scenario 5

SESSIONS_IN_TRANSACTION = (
    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
    f"AND state LIKE 'idle in transaction%' AND state_change < now() - interval '{DATABASE_TIMEOUT_S + 1} s'"
)
"""Sessions left inside a transaction by a silent client for longer than the timeout (a live client's sessions
pass through that state for a moment only)."""


@pytest.mark.timeout(120)
async def test_a_silent_network_loss_is_noticed_within_the_database_timeout_and_survived(
    tmp_path: Path, postgres_url: str, fake_upstream: MockUpstream, scale: Scale
) -> None:
    count = scale(1000, 6000)
    target = urlsplit(postgres_url)
    assert target.hostname is not None and target.port is not None
    began = time.monotonic()
    async with BlackHoleRelay(target.hostname, target.port) as relay:
        credentials = target.netloc.rpartition("@")[0]
        relayed = target._replace(netloc=f"{credentials}@127.0.0.1:{relay.port}").geturl()
        config = write_config(tmp_path, relayed, fake_upstream.url, database_timeout=f"{DATABASE_TIMEOUT_S}s")
        async with Deployment(tmp_path, config) as fleet, aiohttp.ClientSession() as http:
            (daemon, metrics), (api_process, api) = await asyncio.gather(
                start_daemon(fleet, http), start_api(fleet, http)
            )
            pids = (daemon.pid, api_process.pid)
            setup_s = time.monotonic() - began
            batch_id = await create_batch(http, api, count)
            created = time.monotonic()
            await polling.until(
                lambda: fake_upstream.stats.requests_total >= count // 4,
                within=60,
                message="a quarter of the batch sent",
            )
            quarter_s = time.monotonic() - created

            errors_before = await database_errors(http, metrics)
            assert errors_before is not None
            # The worst moment: one connection inside a transaction (the daemon's sweeps open one every 200 ms).
            relay.black_hole(inside_a_transaction=True)
            await asyncio.wait_for(relay.holed.wait(), START_WITHIN)
            lost = time.monotonic()
            in_flight_at_loss = fake_upstream.stats.in_flight

            async def daemon_noticed() -> float | None:
                errors = await database_errors(http, metrics)
                return time.monotonic() - lost if errors is not None and errors > errors_before else None

            async def api_unready() -> tuple[float, Probe] | None:
                answer = await probe(http, f"{api}/readyz")
                return (time.monotonic() - lost, answer) if answer.status == 503 else None

            daemon_after, (api_after, unready) = await asyncio.gather(
                polling.until(daemon_noticed, within=DATABASE_TIMEOUT_S + NOTICE_MARGIN_S, interval=0.1,
                              message="the daemon to count a database error"),
                polling.until(api_unready, within=DATABASE_TIMEOUT_S + NOTICE_MARGIN_S, interval=0.1,
                              message="/readyz to answer 503"),
            )  # fmt: skip
            read = await probe(http, f"{api}/v1/batches/{batch_id}")
            # Hold the loss for two timeouts and more: statements, reconnections and their cancellations all time
            # out, and the server ends the transaction left open.
            await polling.until(
                lambda: time.monotonic() - lost >= 2 * DATABASE_TIMEOUT_S + 1,
                within=30,
                message="the loss to last",
            )
            stranded = relay.stranded_connections
            at_resume = await fetch(postgres_url, SESSIONS_IN_TRANSACTION)
            relay.resume()
            resumed = time.monotonic()

            await polling.until(
                lambda: probe_ok(http, f"{api}/readyz"), within=30, interval=0.1, message="the API ready again"
            )
            batch = await finished_batch(http, api, batch_id, within=90)
            finished_after = time.monotonic() - resumed
            seen, error_lines = await result_custom_ids(http, api, batch)
            for child in (daemon, api_process):
                child.check_running()
            # Sessions of the black-holed connections are still open at the server; none may be left inside
            # a transaction (holding locks): the server ended those transactions.
            stuck = await fetch(postgres_url, SESSIONS_IN_TRANSACTION)
            daemons = await fetch(postgres_url, "SELECT pid, status FROM daemons")

    duplicates = sent_more_than_once(fake_upstream)
    report(
        "silent network loss",
        requests=count,
        setup_s=f"{setup_s:.2f}",
        first_quarter_s=f"{quarter_s:.2f}",
        database_timeout_s=DATABASE_TIMEOUT_S,
        loss_lasted_s=f"{resumed - lost:.2f}",
        upstream_in_flight_at_loss=in_flight_at_loss,
        stranded_connections=stranded,
        daemon_noticed_after_s=f"{daemon_after:.2f}",
        readyz_503_after_s=f"{api_after:.2f}",
        readyz_answer_s=f"{unready.seconds:.2f}",
        api_read_during_loss=f"{read.status} in {read.seconds:.2f} s",
        batch_finished_after_resume_s=f"{finished_after:.2f}",
        **result_figures(count, seen, error_lines, duplicates),
        sessions_in_transaction_at_resume=at_resume[0]["n"],
        sessions_left_in_transaction=stuck[0]["n"],
    )
    assert stranded > 0, "the black hole caught no connection: the test proves nothing"
    assert read.status == 503 and read.seconds < DATABASE_TIMEOUT_S + NOTICE_MARGIN_S, read
    check_results(count, batch, seen, error_lines, duplicates)
    assert (daemon.pid, api_process.pid) == pids
    assert [(row["pid"], row["status"]) for row in daemons] == [(daemon.pid, "running")]
    assert stuck[0]["n"] == 0
