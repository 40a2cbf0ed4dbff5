"""Requests per second of one fusillade daemon process against a fast upstream, compared in the same run with a
bare aiohttp loop at the same concurrency (the ceiling: no database, no state).

Every run starts the mock upstream (`python -m fusillade.mock_upstream`, no latency) in its own process, then:
- `bare`: one process sends N chat completion POSTs with C concurrent workers over one aiohttp session;
- `sqlite` / `postgres`: a fresh database holds one batch of N requests (setup, not timed); one daemon process
  (model limit C) drains it; timed from the daemon's start to the last request terminal, as seen by looking at
  the daemon's own counters every 10 ms from that process (the batch's counts are checked in the database at
  the end). Both sides run on uvloop with `fusillade.runtime.tune_interpreter()`, as the CLI does.
Each mode runs `--runs` times, interleaved (bare, sqlite, postgres, bare, ...), so that drift of the shared
machine hits all alike. Reported: medians, and each fusillade median as a share of the bare loop's.

    .venv/bin/python bench/daemon_throughput.py [--requests 20000] [--concurrency 64] [--runs 3]
        [--modes bare sqlite postgres] [--ticks-in-flight N]

PostgreSQL: `$FUSILLADE_BENCH_POSTGRES_URL` (a server URL; a scratch database is created and dropped), default
postgresql://postgres@127.0.0.1:5432/postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import machine
from fusillade import runtime
from fusillade.daemon import Daemon, DaemonSettings
from fusillade.domain import models
from queue_throughput import BODY, MODEL, database, templates

HERE = Path(__file__).resolve()


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


# ------------------------------------------------------------------------------------------ the bare loop


async def bare_loop(url: str, requests: int, concurrency: int) -> float:
    import aiohttp

    remaining = iter(range(requests))
    body = BODY.encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            for _ in remaining:
                async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


# ------------------------------------------------------------------------------------------- the daemon


async def daemon_run(url: str, database_url: str, requests: int, concurrency: int, ticks_in_flight: int) -> float:
    from fusillade.storage import factory
    from fusillade.storage.base import WritePriority
    from fusillade.upstream.client import UpstreamClient
    from fusillade.upstream.routes import Route

    # As `fusillade daemon` and serve's daemon process open it (on SQLite: a write turn taken per transaction).
    storage = await factory.open_storage(database_url, write_priority=WritePriority.HIGH)
    try:
        upload = await storage.create_file(
            owner="bench", filename="bench.jsonl", templates=templates(requests), size_bytes=requests * len(BODY)
        )
        batch = await storage.create_batch(
            models.BatchSpec(owner="bench", input_file_id=upload.id, endpoint="/v1/chat/completions")
        )
        async with UpstreamClient() as client:
            daemon = Daemon(
                storage,
                client,
                {MODEL: Route(base_url=url, api_key="bench", concurrency=concurrency)},
                settings=DaemonSettings(
                    purge_interval=None, maintenance_interval=timedelta(seconds=1), ticks_in_flight=ticks_in_flight
                ),
            )
            started = time.perf_counter()
            task = asyncio.create_task(daemon.run())
            # Watch the daemon's own counters (reading the batch's counts from the database every few
            # milliseconds would load the database the daemon writes to); check the database at the end.
            while finished_requests(daemon) < requests:
                await asyncio.sleep(0.01)  # each look collects every metric: overhead on the daemon's own loop
                if task.done():
                    task.result()
                    raise RuntimeError("The daemon stopped before the batch finished.")
            elapsed = time.perf_counter() - started
            current = await storage.get_batch(batch.id, owner=models.ALL_OWNERS)
            if current.counts.completed != requests:
                raise RuntimeError(f"Only {current.counts.completed} of {requests} requests completed.")
            daemon.stop()
            await task
            return elapsed
    finally:
        await storage.close()


def finished_requests(daemon: Daemon) -> float:
    return sum(
        sample.value
        for metric in daemon.metrics.requests_finished.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


# ------------------------------------------------------------------------------------------ harness


@contextlib.contextmanager
def mock_upstream() -> Iterator[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fusillade.mock_upstream",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-track-custom-ids",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"The mock upstream did not start (printed {url!r}).")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


async def one_run(mode: str, url: str, requests: int, concurrency: int, ticks_in_flight: int) -> float:
    """Run one measurement in a fresh process; returns requests per second."""
    async with contextlib.AsyncExitStack() as stack:
        target = "-" if mode == "bare" else await stack.enter_async_context(database(mode))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE),
            "--role",
            mode,
            "--upstream",
            url,
            "--database",
            target,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
            "--ticks-in-flight",
            str(ticks_in_flight),
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"The {mode} run failed (exit {process.returncode}).")
        return requests / float(output.decode().strip().splitlines()[-1])


def child(arguments: argparse.Namespace) -> None:
    # Both sides run as the CLI runs the daemon: on uvloop, with the interpreter tuned (fusillade.runtime).
    install_uvloop()
    runtime.tune_interpreter()
    if arguments.role == "bare":
        elapsed = asyncio.run(bare_loop(arguments.upstream, arguments.requests, arguments.concurrency))
    else:
        elapsed = asyncio.run(
            daemon_run(
                arguments.upstream,
                arguments.database,
                arguments.requests,
                arguments.concurrency,
                arguments.ticks_in_flight,
            )
        )
    print(f"{elapsed:.6f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--ticks-in-flight",
        type=int,
        default=DaemonSettings().ticks_in_flight,
        help="the daemon's `ticks_in_flight` setting (default: its default)",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["bare", "sqlite", "postgres"], choices=["bare", "sqlite", "postgres"]
    )
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.role:
        child(arguments)
        return
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine.describe())
    print(
        f"requests per run: {arguments.requests}, concurrency {arguments.concurrency}, runs: {arguments.runs}, "
        f"daemon ticks in flight: {arguments.ticks_in_flight}"
    )
    results: dict[str, list[float]] = {mode: [] for mode in arguments.modes}
    with mock_upstream() as url:
        for _ in range(arguments.runs):
            for mode in arguments.modes:
                results[mode].append(
                    asyncio.run(
                        one_run(mode, url, arguments.requests, arguments.concurrency, arguments.ticks_in_flight)
                    )
                )
    medians = {mode: statistics.median(values) for mode, values in results.items()}
    for mode, values in results.items():
        runs = ", ".join(f"{value:,.0f}" for value in values)
        share = (
            f"  ({medians[mode] / medians['bare']:.0%} of bare)" if "bare" in medians and mode != "bare" else ""
        )
        print(f"{mode:>8}: median {medians[mode]:,.0f} requests/s{share}  (runs: {runs})")


if __name__ == "__main__":
    main()
