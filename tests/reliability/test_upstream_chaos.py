"""Scenario 4, upstream chaos: the real `fusillade daemon` process against a fake upstream that misbehaves in
every way an OpenAI-compatible server does: 5xx, 429 with Retry-After, connection resets, stalls before the
first byte and in the middle of a body or stream, truncated and malformed SSE, errors inside a 200 stream,
slow-drip bodies, permanent 4xx, and requests that keep failing until their batch's deadline.

Every fault is scripted per custom id and attempt (`Behaviour.faults_by_custom_id`), so each request's end is
known in advance: its final state and error code, the codes of its retries, and how many attempts the
upstream receives. The assertions read the database (request rows, output and error files), the daemon's own
retry counters (`/metrics`) and the upstream's receipt times per custom id.

Routes (one TOML file, written here): `plain` (JSON) and `sse` (`stream = true`) with short phase timeouts;
`dl-plain` and `dl-sse`, the same, for the deadline batch (a 429 pauses its model's whole lane, so the two
batches keep to their own lanes and one batch's rate limits cannot shift the other's retries); `hold` with no
phase timeout at all, where only the batch deadline can end a call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusillade.domain import models, states
from fusillade.mock_upstream import (
    Arrival,
    Behaviour,
    ConnectionReset,
    EmbeddedError,
    Fault,
    HttpError,
    MalformedEvent,
    MockUpstream,
    SlowDrip,
    StallBeforeFirstByte,
    StallMidStream,
    TruncatedStream,
    reply_text,
)
from fusillade.storage import base, factory
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.outcome import Success
from fusillade.upstream.routes import Route
from tests.integration.conftest import fast_settings, routes_for, running
from tests.reliability.conftest import Scale
from tests.support import factories, polling, postgres
from tests.support.processes import Processes

pytestmark = pytest.mark.reliability

# ----------------------------------------------------------------------------------------- the setup

FIRST_BYTE_S = 1.5
IDLE_S = 0.75
TOTAL_S = 4.0
BASE_DELAY_S = 0.05
MAX_DELAY_S = 0.2
JITTER = 0.2
DEADLINE_WINDOW = "5s"
"""The deadline batch's completion window: long enough for many retries at MAX_DELAY_S apart."""

DEADLINE_TOLERANCE_S = 0.25
"""How late after its batch's `expires_at` an attempt may still be seen arriving upstream. The client checks
the deadline just before it writes the request (`UpstreamClient.send`), so the margin is only what separates
that check from the upstream handler's timestamp: the loopback hop and the test process' event loop, which
runs the fake upstream and may be busy for a while polling the database on a loaded 2-core machine."""
LAST_ATTEMPT_SLACK_S = 0.75
"""Retries go on until the next one could not start before the deadline: the last attempt of a request that
keeps failing starts at most `MAX_DELAY_S * (1 + JITTER)` before it, plus this slack for the time between the
upstream receiving an attempt and the daemon deciding on its answer, under load."""
RETRY_AFTER_CLOCK_SLACK_S = 0.002
"""The next attempt's `not_before` is the daemon's wall clock at the 429 plus the Retry-After, stored in
microseconds; the upstream stamps arrivals with the same wall clock. Only rounding separates them."""

PLAIN, SSE, DL_PLAIN, DL_SSE, HOLD = "plain", "sse", "dl-plain", "dl-sse", "hold"
STREAMING = {PLAIN: False, SSE: True, DL_PLAIN: False, DL_SSE: True, HOLD: False}
CONCURRENCY = 32


def config_text(database: Path, upstream_url: str) -> str:
    short = f'connect = "2s"\nfirst_byte = "{FIRST_BYTE_S}s"\nidle = "{IDLE_S}s"\ntotal = "{TOTAL_S}s"\n'
    none = 'connect = "2s"\nfirst_byte = "none"\nidle = "none"\ntotal = "none"\n'
    text = f"""database_url = "sqlite:///{database}"

[daemon]
idle_poll_interval = "100ms"
maintenance_interval = "100ms"
heartbeat_interval = "1s"
stale_after = "30s"
shutdown_grace = "2s"

[daemon.retry]
base_delay = "{BASE_DELAY_S}s"
factor = 2.0
max_delay = "{MAX_DELAY_S}s"
jitter = {JITTER}
max_attempts = "none"
"""
    for model, stream in STREAMING.items():
        text += f'\n[models."{model}"]\nbase_url = "{upstream_url}"\nconcurrency = {CONCURRENCY}\n'
        text += f"stream = {'true' if stream else 'false'}\n"
        text += f'[models."{model}".timeouts]\n' + (none if model == HOLD else short)
    return text


# ------------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    custom_id: str
    model: str
    script: tuple[Fault | None, ...] = ()
    """The upstream's fault for each attempt in turn; then it answers normally."""
    retries: tuple[str, ...] = ()
    """The code of each retried attempt, in order (main batch: the attempts are exactly these plus one)."""
    failed: str | None = None
    """The final error code; None: completed."""


E500 = HttpError(500)
EXPIRED = "batch_expired"
FOREVER = 1000
"""Attempts scripted for a request that must keep failing until its deadline (far more than can fit)."""

MAIN_CASES = [
    Case("ok-plain", PLAIN),
    Case("ok-sse", SSE),
    Case("500-twice-plain", PLAIN, (E500, E500), ("http_500", "http_500")),
    Case("502-sse", SSE, (HttpError(502),), ("http_502",)),
    Case("503-retry-after-plain", PLAIN, (HttpError(503, retry_after_s=1),), ("http_503",)),
    Case("429-retry-after-plain", PLAIN, (HttpError(429, retry_after_s=1),), ("http_429",)),
    Case("429-ms-twice-sse", SSE, (HttpError(429, retry_after_ms=700),) * 2, ("http_429",) * 2),
    # retry-after-ms wins over Retry-After, as in the OpenAI SDK.
    Case("429-ms-wins-sse", SSE, (HttpError(429, retry_after_s=1, retry_after_ms=1300),), ("http_429",)),
    Case("reset-twice-plain", PLAIN, (ConnectionReset(),) * 2, ("connection_error",) * 2),
    Case("reset-sse", SSE, (ConnectionReset(),), ("connection_error",)),
    Case("stall-first-byte-plain", PLAIN, (StallBeforeFirstByte(),), ("timeout",)),
    Case("stall-first-byte-sse", SSE, (StallBeforeFirstByte(),), ("timeout",)),
    Case("stall-mid-body-plain", PLAIN, (StallMidStream(),), ("timeout",)),
    Case("stall-mid-stream-sse", SSE, (StallMidStream(after_events=2),), ("timeout",)),
    Case("truncated-body-plain", PLAIN, (TruncatedStream(),), ("connection_error",)),
    Case("truncated-stream-sse", SSE, (TruncatedStream(after_events=3),), ("stream_error",)),
    Case("malformed-stream-sse", SSE, (MalformedEvent(after_events=2),), ("stream_error",)),
    Case("embedded-500-sse", SSE, (EmbeddedError(after_events=2, status=500),), ("upstream_error",)),
    # Slow drips: pieces well within the idle timeout complete at once; a pause longer than the idle (JSON)
    # or first-event (stream) timeout is retried; a drip that never pauses too long but outlasts the total
    # timeout is retried too.
    Case("drip-within-idle-plain", PLAIN, (SlowDrip(chunk_bytes=32, interval_s=0.05),)),
    Case("drip-within-idle-sse", SSE, (SlowDrip(chunk_bytes=64, interval_s=0.05),)),
    Case("drip-beyond-idle-plain", PLAIN, (SlowDrip(chunk_bytes=16, interval_s=3.0),), ("timeout",)),
    Case("drip-beyond-first-event-sse", SSE, (SlowDrip(chunk_bytes=16, interval_s=3.0),), ("timeout",)),
    Case("drip-beyond-total-plain", PLAIN, (SlowDrip(chunk_bytes=8, interval_s=0.4),), ("timeout",)),
    Case(
        "everything-sse",
        SSE,
        (
            E500,
            ConnectionReset(),
            StallBeforeFirstByte(),
            TruncatedStream(after_events=2),
            MalformedEvent(after_events=1),
            HttpError(429, retry_after_s=1),
        ),
        ("http_500", "connection_error", "timeout", "stream_error", "stream_error", "http_429"),
    ),
    # Permanent: sent once, never retried.
    Case("400-plain", PLAIN, (HttpError(400),), failed="http_400"),
    Case("404-plain", PLAIN, (HttpError(404),), failed="http_404"),
    Case("401-sse", SSE, (HttpError(401),), failed="http_401"),
    Case("422-sse", SSE, (HttpError(422),), failed="http_422"),
    Case("embedded-400-sse", SSE, (EmbeddedError(after_events=1, status=400),), failed="upstream_error"),
    # A 200 whose body is not JSON is a success stored as a JSON string (classify.py, docs/http-api.md).
    Case("not-json-body-plain", PLAIN, (MalformedEvent(),)),
]

DEADLINE_CASES = [
    *(Case(f"dl-500-plain-{n}", DL_PLAIN, (E500,) * FOREVER, failed="http_500") for n in range(1, 4)),
    *(
        Case(f"dl-reset-sse-{n}", DL_SSE, (ConnectionReset(),) * FOREVER, failed="connection_error")
        for n in (1, 2)
    ),
    # Only the deadline ends this call (the route has no phase timeout).
    Case("dl-hang", HOLD, (StallBeforeFirstByte(),), failed="batch_expired"),
    # A Retry-After beyond the deadline: given up at once, not retried at the deadline.
    Case("dl-429-beyond-deadline", HOLD, (HttpError(429, retry_after_s=3600),), failed="http_429"),
]


def copies(cases: list[Case], count: int) -> list[Case]:
    """`count` copies of each case (`--long`: several requests per fault), each with its own custom id."""
    if count == 1:
        return cases
    return [replace(case, custom_id=f"{case.custom_id}.{n}") for n in range(1, count + 1) for case in cases]


def templates(cases: list[Case]) -> list[models.TemplateInput]:
    return factories.templates(
        custom_ids=[case.custom_id for case in cases], models_by_line=[case.model for case in cases]
    )


def prompt(template: models.TemplateInput) -> str:
    return str(orjson.loads(template.body)["messages"][-1]["content"])


# ----------------------------------------------------------------------------------------- processes


async def retry_counters(metrics_port: int) -> Counter[tuple[str, str]]:
    """`fusillade_request_retries_total` by (model, code), from the daemon's /metrics."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
    ):
        text = await response.text()
    found: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fusillade_request_retries_total" and sample.value:
                found[(sample.labels["model"], sample.labels["code"])] = int(sample.value)
    return found


async def finished(storage: base.Storage, batch: models.Batch, *, within: float) -> models.Batch:
    async def check() -> models.Batch | None:
        current = await storage.get_batch(batch.id, owner=models.ALL_OWNERS)
        return current if current.completed_at or current.expired_at else None

    return await polling.until(check, within=within, interval=0.1, message=f"batch {batch.id} to finish")


# ------------------------------------------------------------------------------------------ the test


@pytest.mark.timeout(150)
async def test_upstream_chaos_ends_every_request_as_scripted(tmp_path: Path, scale: Scale) -> None:
    main_cases = copies(MAIN_CASES, scale(1, 4))
    deadline_cases = copies(DEADLINE_CASES, scale(1, 4))
    cases = {case.custom_id: case for case in main_cases + deadline_cases}
    behaviour = Behaviour(faults_by_custom_id={case.custom_id: case.script for case in cases.values()})
    storage = await factory.open_storage(f"sqlite:///{tmp_path / 'chaos.db'}")
    await storage.migrate()
    try:
        async with MockUpstream(behaviour) as upstream, Processes(tmp_path) as processes:
            config = tmp_path / "fusillade.toml"
            config.write_text(config_text(tmp_path / "chaos.db", upstream.url))
            metrics_port = postgres.free_port()
            # `fusillade daemon --config CONFIG` as an operator starts it.
            daemon = processes.start(
                "daemon", "daemon", "--config", str(config), "--metrics-port", str(metrics_port)
            )

            async def registered() -> bool:
                daemon.check_running()
                alive = states.DaemonStatus.RUNNING
                return any(d.pid == daemon.pid and d.status is alive for d in await storage.list_daemons())

            await polling.until(registered, within=60, interval=0.05, message="the daemon to register")
            main_file = await factories.upload(storage, items=templates(main_cases))
            deadline_file = await factories.upload(storage, items=templates(deadline_cases))
            main = await factories.create_batch(storage, file=main_file)
            deadline = await factories.create_batch(storage, file=deadline_file, window=DEADLINE_WINDOW)
            started = time.monotonic()

            main_done = await finished(storage, main, within=60)
            deadline_done = await finished(storage, deadline, within=60)
            elapsed = time.monotonic() - started
            retries = await retry_counters(metrics_port)
            assert await daemon.stop(within=30) == 0
            # Upstream trouble is the daemon's daily work, not an error of its own: no task failed.
            logged = daemon.log_text()
            assert not any(word in logged for word in (" ERROR ", " CRITICAL ", "Traceback")), logged[-4000:]
            arrivals = {key: list(value) for key, value in upstream.stats.attempts_by_custom_id.items()}
            max_in_flight = dict(upstream.stats.max_in_flight_by_model)

        with processes.logs_on_failure():
            rows = {
                request.custom_id: request
                for batch in (main, deadline)
                for request in await factories.all_requests(storage, batch.id)
            }
            lines = {}
            for batch in (main_done, deadline_done):
                for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "error")):
                    for line in await factories.result_file_lines(storage, file_id):
                        assert line["custom_id"] not in lines, f"{line['custom_id']} is in the result files twice"
                        lines[line["custom_id"]] = (kind, line)
            report = check_all(
                main_cases, deadline_cases, main_done, deadline_done, rows, lines, arrivals, retries, max_in_flight
            )
    finally:
        await storage.close()
    print(f"\nupstream chaos: {len(cases)} requests, {elapsed:.1f} s after the batches were created; {report}")


def check_all(
    main_cases: list[Case],
    deadline_cases: list[Case],
    main: models.Batch,
    deadline: models.Batch,
    rows: dict[str, models.Request],
    lines: dict[str, tuple[str, dict[str, Any]]],
    arrivals: dict[str, list[Arrival]],
    retries: Counter[tuple[str, str]],
    max_in_flight: dict[str, int],
) -> str:
    """Every assertion on the end state; a one-line summary of the measured figures."""
    cases = {case.custom_id: case for case in main_cases + deadline_cases}
    # Every request is terminal and in exactly one result file.
    assert set(rows) == set(cases) == set(lines)
    assert main.status is states.BatchStatus.COMPLETED
    assert deadline.status is states.BatchStatus.EXPIRED, "dl-hang was still running at the deadline"
    assert main.counts.completed + main.counts.failed == len(main_cases)
    assert deadline.counts.failed == len(deadline_cases)
    expires = deadline.expires_at.timestamp()
    for custom_id, case in cases.items():
        row = rows[custom_id]
        kind, line = lines[custom_id]
        failed = case.failed
        if len(case.script) == FOREVER and row.error_code == EXPIRED:
            # Its last retry was due before the deadline (the daemon schedules none after it) but could not be
            # sent and answered in time: it ends `batch_expired`, like every request unfinished at the deadline.
            assert row.not_before is not None and row.not_before.timestamp() < expires, (custom_id, row)
            failed = EXPIRED
        if failed is None:
            assert row.state is states.RequestState.COMPLETED, (custom_id, row.state, row.error_code)
            assert kind == "output"
        else:
            assert row.state is states.RequestState.FAILED, (custom_id, row.state)
            assert kind == "error"
            if failed.startswith("http_"):
                # An HTTP error is stored as the upstream's answer (its code is `http_<status>`), as OpenAI
                # writes it: `response` with the status and body, `error` null.
                status = int(failed.removeprefix("http_"))
                assert (row.response_status, row.error_code) == (status, None), (custom_id, row)
                assert line["error"] is None
                assert line["response"]["status_code"] == status
                assert line["response"]["body"]["error"]["type"], line
            else:
                assert row.error_code == failed, (custom_id, row.error_code, row.error_message)
                assert line["response"] is None
                assert line["error"]["code"] == failed
            if len(case.script) == FOREVER and failed == case.failed and not failed.startswith("http_"):
                message = row.error_message or ""  # (an HTTP error's message is its response)
                assert message.endswith("(no retry could start before the batch deadline)"), message

    template_by_id = {item.custom_id: item for item in templates(main_cases)}
    for case in main_cases:
        received = arrivals.get(case.custom_id, [])
        # Exactly the scripted attempts: every fault retried once, the permanent ones never.
        assert len(received) == len(case.retries) + 1, (case.custom_id, len(received), case.retries)
        assert rows[case.custom_id].attempt == len(case.retries), case.custom_id
        check_retry_after(case, received)
        if case.failed is None:
            check_success_body(case, lines[case.custom_id][1], prompt(template_by_id[case.custom_id]))

    # The daemon's own retry counters name the same codes, as many times as scripted.
    expected: Counter[tuple[str, str]] = Counter(
        (case.model, code) for case in main_cases for code in case.retries
    )
    sent_after_deadline = []
    for case in deadline_cases:
        received = arrivals.get(case.custom_id, [])
        row = rows[case.custom_id]
        sent_after_deadline += [arrival.wall - expires for arrival in received if arrival.wall > expires]
        if len(case.script) == FOREVER:
            assert len(received) >= 5, (case.custom_id, len(received))
            last = received[-1].wall
            assert last >= expires - MAX_DELAY_S * (1 + JITTER) - LAST_ATTEMPT_SLACK_S, (
                f"{case.custom_id} stopped retrying {expires - last:.2f} s before its deadline"
            )
            # Every attempt but the last was rescheduled; an expired request's last reschedule may not have
            # been sent (or was cut by the deadline).
            sent_last = row.error_code != EXPIRED or len(received) == row.attempt + 1
            assert len(received) == row.attempt + (1 if sent_last else 0), (case.custom_id, row.attempt)
            expected[(case.model, case.failed or "")] += row.attempt
        else:
            assert len(received) == 1, (case.custom_id, len(received))
            assert row.attempt == 0
    assert max(sent_after_deadline, default=0.0) <= DEADLINE_TOLERANCE_S, sent_after_deadline
    assert retries == expected, (retries - expected, expected - retries)
    for model, peak in max_in_flight.items():
        assert peak <= CONCURRENCY, (model, peak)

    forever = [case.custom_id for case in deadline_cases if len(case.script) == FOREVER]
    before = [expires - arrivals[custom_id][-1].wall for custom_id in forever]
    expired = sum(rows[custom_id].error_code == EXPIRED for custom_id in forever)
    return (
        f"main batch {main.counts.completed} completed / {main.counts.failed} failed; deadline batch "
        f"{deadline.counts.failed} failed; the {len(forever)} always-failing requests made "
        f"{sum(len(arrivals[custom_id]) for custom_id in forever)} attempts, the last {min(before):.3f}-"
        f"{max(before):.3f} s before the deadline, and ended with their last error ({len(forever) - expired}) "
        f"or batch_expired ({expired}); {len(sent_after_deadline)} attempts after the deadline "
        f"(latest {max(sent_after_deadline, default=0.0):.3f} s); {sum(retries.values())} retries"
    )


def check_retry_after(case: Case, received: list[Arrival]) -> None:
    """No attempt after an answer with Retry-After reached the upstream before that delay had passed."""
    for index, fault in enumerate(case.script):
        if not isinstance(fault, HttpError) or (fault.retry_after_s is None and fault.retry_after_ms is None):
            continue
        wait = fault.retry_after_ms / 1000 if fault.retry_after_ms is not None else float(fault.retry_after_s or 0)
        gap = received[index + 1].wall - received[index].wall
        assert gap >= wait - RETRY_AFTER_CLOCK_SLACK_S, (
            f"{case.custom_id}: retried after {gap:.3f} s, asked {wait}"
        )


def check_success_body(case: Case, line: dict[str, Any], text: str) -> None:
    """A success is stored in the non-streaming shape, streamed or not, with the upstream's answer."""
    response = line["response"]
    assert response["status_code"] == 200
    body = response["body"]
    if case.custom_id.startswith("not-json-body-plain"):
        assert isinstance(body, str) and body.startswith("this is not JSON"), body
        return
    assert body["object"] == "chat.completion", body
    assert body["model"] == case.model
    [choice] = body["choices"]
    assert "delta" not in choice
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reply_text(text)
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


# ------------------------------------------------------------- regression tests of the defects it found


async def test_every_scheduled_retry_wakes_a_claim_not_only_the_earliest(
    storage: base.Storage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    """The daemon kept one retry timer, the earliest: a retry falling due later than one already waiting was
    forgotten until the idle poll (here 30 s; 1 s by default), and near a deadline the request expired
    instead of getting its last attempt (found by the deadline batch above)."""
    upstream.behaviour = Behaviour(
        faults_by_custom_id={
            "req-1": [HttpError(503, retry_after_ms=200)],
            "req-2": [HttpError(503, retry_after_ms=500)],
            "req-3": [HttpError(503, retry_after_ms=800)],
        }
    )
    batch = await factories.create_batch(storage, count=3)
    settings = fast_settings(idle_poll_interval=timedelta(seconds=30))
    async with running(storage, client, routes_for(upstream, {"model-a": 4}), settings) as daemon:
        daemon.notify_work()
        done = await polling.until(
            lambda: _finished_or_none(storage, batch), within=10, message="every retry to be sent when due"
        )
    assert done.counts.completed == 3
    for custom_id, wait in (("req-1", 0.2), ("req-2", 0.5), ("req-3", 0.8)):
        first, second = upstream.stats.attempts_by_custom_id[custom_id]
        # Sent after its Retry-After, and long before the idle poll would have found it.
        assert wait - RETRY_AFTER_CLOCK_SLACK_S <= second.wall - first.wall < wait + 5, (custom_id, first, second)


async def _finished_or_none(storage: base.Storage, batch: models.Batch) -> models.Batch | None:
    current = await storage.get_batch(batch.id, owner=models.ALL_OWNERS)
    return current if current.completed_at else None


async def test_a_call_whose_deadline_has_passed_is_not_sent_even_on_a_pooled_connection(
    upstream: MockUpstream, client: UpstreamClient
) -> None:
    """On a warm keep-alive connection aiohttp writes a request before its first suspension, so a deadline
    timer already due could not stop it: a request claimed just after its batch's deadline reached the
    upstream. `send` now refuses to start after the deadline."""
    route = Route(base_url=upstream.url, concurrency=4)
    loop = asyncio.get_running_loop()
    assert isinstance(await client.send(claimed("warm-up"), route), Success)  # a connection in the pool
    for number in range(3):
        with pytest.raises(TimeoutError):
            await client.send(claimed(f"late-{number}"), route, deadline=loop.time() - 0.001)
    assert isinstance(await client.send(claimed("in-time"), route, deadline=loop.time() + 30), Success)
    assert sorted(upstream.stats.attempts_by_custom_id) == ["in-time", "warm-up"]


def claimed(custom_id: str) -> models.ClaimedRequest:
    now = datetime.now(UTC)
    body = orjson.dumps({"model": "model-a", "messages": [{"role": "user", "content": custom_id}]}).decode()
    return models.ClaimedRequest(
        id=uuid.uuid4(),
        batch_id=uuid.uuid4(),
        daemon_id=uuid.uuid4(),
        owner="alice",
        custom_id=custom_id,
        model="model-a",
        method="POST",
        url="/v1/chat/completions",
        body=body,
        attempt=0,
        deadline=now,
        claimed_at=now,
    )
