"""How soon an idle `fusillade serve` sends a new batch's first request: the time from the answer to `POST
/v1/batches` to that request's arrival at the upstream.

`fusillade serve` runs as a user runs it (its own process, its daemon in a child process, default settings) on
a fresh SQLite database, or with `--backend postgres` a scratch PostgreSQL database. Its one model is routed to
an upstream served by this process (aiohttp), which answers one fixed chat completion and notes when each
request arrives (`time.monotonic()`, the clock of the client's timestamps too). After a first batch (shown
apart: the upstream connection is new), each of `--batches` rounds waits `--idle` seconds with nothing to do
(the daemon sleeps in its idle poll), uploads a file of `--lines` requests, creates a batch on it, and waits
until the batch is completed. Reported: the median (and every value) of the time from the create answer to the
first request's arrival (negative: the request arrived before the answer did), and from sending the create.

    .venv/bin/python bench/first_request.py [--batches 10] [--idle 3] [--lines 4] [--backend sqlite|postgres]

PostgreSQL: `$FUSILLADE_BENCH_POSTGRES_URL` (a server URL; a scratch database is created and dropped), default
postgresql://postgres@127.0.0.1:5432/postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

import machine
from queue_throughput import BODY, MODEL, RESPONSE, database

LISTENING = re.compile(r"Listening on (http://\S+) \(")
DAEMON_STARTED = re.compile(r"Daemon [0-9a-f-]{36} started")
START_WITHIN = 60.0
BATCH_WITHIN = 30.0


class Upstream:
    """The upstream: answers every chat completion at once, noting when each arrived."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.arrived = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.arrived.set()
        await request.read()
        return web.Response(body=RESPONSE.encode(), content_type="application/json")

    async def first_after(self, moment: float) -> float:
        """The arrival time of the first request that arrived after `moment` (waiting for it)."""
        while True:
            later = [arrival for arrival in self.arrivals if arrival >= moment]
            if later:
                return later[0]
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), BATCH_WITHIN)


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    recorder = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", recorder.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield recorder, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(directory: Path, database_url: str, upstream_url: str) -> AsyncIterator[str]:
    """`fusillade serve` in `directory` on `database_url`, the bench model routed to `upstream_url`; its URL
    once it listens and its daemon has registered."""
    config = directory / "fusillade.toml"
    config.write_text(
        f'database_url = "{database_url}"\n\n[models."{MODEL}"]\nbase_url = "{upstream_url}"\nconcurrency = 8\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fusillade",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        cwd=directory,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[str] = []
    url: str | None = None
    registered = False

    async def read_log() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            log.append(line.decode(errors="replace"))

    try:
        async with asyncio.timeout(START_WITHIN):
            while url is None or not registered:
                line = (await process.stderr.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError("fusillade serve exited:\n" + "".join(log))
                log.append(line)
                if found := LISTENING.search(line):
                    url = found.group(1)
                registered = registered or DAEMON_STARTED.search(line) is not None
        reader = asyncio.create_task(read_log())  # keep the pipe from filling up
        try:
            yield url
        finally:
            process.terminate()
            await process.wait()
            await reader
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def one_batch(
    session: aiohttp.ClientSession, url: str, recorder: Upstream, lines: int
) -> tuple[float, float]:
    """Upload and create one batch; (first arrival - create answer, first arrival - create sent) in seconds,
    once the batch is completed."""
    content = "".join(
        json.dumps(
            {"custom_id": f"r{line}", "method": "POST", "url": "/v1/chat/completions", "body": json.loads(BODY)}
        )
        + "\n"
        for line in range(lines)
    )
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content.encode(), filename="requests.jsonl", content_type="application/jsonl")
    async with session.post(f"{url}/v1/files", data=form) as response:
        assert response.status == 200, await response.text()
        file_id = (await response.json())["id"]
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    sent = time.monotonic()
    async with session.post(f"{url}/v1/batches", json=create) as response:
        body = await response.read()
        answered = time.monotonic()
        assert response.status == 200, body
    batch_id = json.loads(body)["id"]
    first = await recorder.first_after(sent)
    async with asyncio.timeout(BATCH_WITHIN):
        while True:
            async with session.get(f"{url}/v1/batches/{batch_id}") as response:
                if (await response.json())["status"] == "completed":
                    break
            await asyncio.sleep(0.05)
    return first - answered, first - sent


async def measure(
    backend: str, batches: int, idle: float, lines: int
) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    with tempfile.TemporaryDirectory(prefix="fusillade-bench-first-") as directory:
        async with (
            database(backend) as database_url,
            upstream() as (recorder, upstream_url),
            serve(Path(directory), database_url, upstream_url) as url,
            aiohttp.ClientSession() as session,
        ):
            await asyncio.sleep(idle)
            first = await one_batch(session, url, recorder, lines)
            results = []
            for _ in range(batches):
                await asyncio.sleep(idle)  # the daemon goes back to its idle poll
                results.append(await one_batch(session, url, recorder, lines))
            return first, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before each batch")
    parser.add_argument("--lines", type=int, default=4, help="requests per batch")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    arguments = parser.parse_args()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine.describe())
    print(
        f"batches: {arguments.batches} (after a first one), each created after {arguments.idle:g} s idle, "
        f"{arguments.lines} requests each; fusillade serve on {arguments.backend}, default settings"
    )
    first, results = asyncio.run(measure(arguments.backend, arguments.batches, arguments.idle, arguments.lines))
    after_answer = [answer * 1000 for answer, _ in results]
    after_sent = [sent * 1000 for _, sent in results]
    print(
        f"first batch after start: {first[0] * 1000:.1f} ms after the create answer "
        f"({first[1] * 1000:.1f} ms after sending it)"
    )
    print(
        f"from the create answer to the first request: median {statistics.median(after_answer):.1f} ms, "
        f"max {max(after_answer):.1f} ms  (batches: {', '.join(f'{value:.1f}' for value in after_answer)})"
    )
    print(
        f"from sending the create to the first request: median {statistics.median(after_sent):.1f} ms  "
        f"(batches: {', '.join(f'{value:.1f}' for value in after_sent)})"
    )


if __name__ == "__main__":
    main()
