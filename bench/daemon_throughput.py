"""Requests per second and CPU per request of fusillade against an upstream far cheaper than itself, compared in
the same run with a bare aiohttp loop at the same concurrency (the ceiling: no database, no state).

The upstream is nginx answering one fixed chat completion (`nginx_upstream.py`: a few microseconds per request,
so the figures are the client's cost), or with `--upstream mock` the Python mock (`python -m
fusillade.mock_upstream`, no latency), whose own ~200 us per request on the same two cores hides part of the
daemon's cost. Modes:
- `bare`: one process sends N chat completion POSTs with C concurrent workers over one aiohttp session set up as
  well as aiohttp allows (no connection cap, no cookie jar, no total timer), on uvloop;
- `sqlite` / `postgres`: a fresh database holds one batch of N requests (setup, not timed); one daemon process
  (model limit C) drains it; timed from the daemon's start to the last request terminal, as seen by looking at
  the daemon's own counters every 10 ms from that process (the batch's counts are checked in the database at
  the end). Both sides run on uvloop with `fusillade.runtime.tune_interpreter()`, as the CLI does;
- `run`: the whole `fusillade run` command on an input file of N lines (SQLite next to it), as a user runs it:
  start-up, validation, ingest, dispatch and the output file, timed from exec to exit.
CPU per request: the process's user + system time over the timed part (`bare`, `sqlite`, `postgres`), or of the
whole command (`run`), divided by N. Each mode runs `--runs` times, interleaved (bare, sqlite, ..., bare, ...), so
that drift of the shared machine hits all alike. Reported: medians, and each as a share of the bare loop's.

    .venv/bin/python bench/daemon_throughput.py [--requests 20000] [--concurrency 64] [--runs 3]
        [--modes bare sqlite postgres run] [--upstream nginx|mock] [--ticks-in-flight N]

PostgreSQL: `$FUSILLADE_BENCH_POSTGRES_URL` (a server URL; a scratch database is created and dropped), default
postgresql://postgres@127.0.0.1:5432/postgres. nginx: `/usr/sbin/nginx` (`apt-get install nginx`) or
`$FUSILLADE_BENCH_NGINX`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import machine
from fusillade import runtime
from fusillade.daemon import Daemon, DaemonSettings
from fusillade.domain import models
from nginx_upstream import nginx_upstream
from queue_throughput import BODY, MODEL, bench_batch, database

HERE = Path(__file__).resolve()
MODES = ("bare", "sqlite", "postgres", "run")


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


# ------------------------------------------------------------------------------------------ the bare loop


async def bare_loop(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    import aiohttp

    remaining = iter(range(requests))
    body = BODY.encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
    ) as session:

        async def worker() -> None:
            for _ in remaining:
                async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, time.process_time() - cpu


# ------------------------------------------------------------------------------------------- the daemon


async def daemon_run(
    url: str, database_url: str, requests: int, concurrency: int, ticks_in_flight: int
) -> tuple[float, float]:
    from fusillade.storage import factory
    from fusillade.storage.base import WritePriority
    from fusillade.upstream.client import UpstreamClient
    from fusillade.upstream.routes import Route

    # As `fusillade daemon` and serve's daemon process open it (on SQLite: a write turn taken per transaction).
    storage = await factory.open_storage(database_url, write_priority=WritePriority.HIGH)
    try:
        batch = await bench_batch(storage, requests)
        async with UpstreamClient() as client:
            daemon = Daemon(
                storage,
                client,
                {MODEL: Route(base_url=url, api_key="bench", concurrency=concurrency)},
                settings=DaemonSettings(
                    purge_interval=None, maintenance_interval=timedelta(seconds=1), ticks_in_flight=ticks_in_flight
                ),
            )
            started, cpu = time.perf_counter(), time.process_time()
            task = asyncio.create_task(daemon.run())
            # Watch the daemon's own counters (reading the batch's counts from the database every few
            # milliseconds would load the database the daemon writes to); check the database at the end.
            while finished_requests(daemon) < requests:
                await asyncio.sleep(0.01)  # each look collects every metric: overhead on the daemon's own loop
                if task.done():
                    task.result()
                    raise RuntimeError("The daemon stopped before the batch finished.")
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            current = await storage.get_batch(batch.id, owner=models.ALL_OWNERS)
            if current.counts.completed != requests:
                raise RuntimeError(f"Only {current.counts.completed} of {requests} requests completed.")
            daemon.stop()
            await task
            return elapsed, cpu
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
def mock_upstream(*options: str) -> Iterator[str]:
    """The Python mock upstream in a process of its own, with its command line `options`; its URL."""
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
            *options,
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


class Measure:
    """One run: requests per second, and CPU microseconds per request."""

    def __init__(self, requests: int, elapsed: float, cpu: float) -> None:
        self.rate = requests / elapsed
        self.cpu_us = cpu / requests * 1e6


async def one_run(mode: str, url: str, requests: int, concurrency: int, ticks_in_flight: int) -> Measure:
    """Run one measurement in a fresh process."""
    if mode == "run":
        return await asyncio.to_thread(command_run, url, requests, concurrency)
    output = await child_output(HERE, mode, url, requests, concurrency, "--ticks-in-flight", str(ticks_in_flight))
    elapsed, cpu = map(float, output.split())
    return Measure(requests, elapsed, cpu)


async def child_output(script: Path, mode: str, url: str, requests: int, concurrency: int, *extra: str) -> str:
    """Run `script --role MODE` in a fresh process (a scratch database for the daemon's modes); its last line."""
    async with contextlib.AsyncExitStack() as stack:
        target = "-" if mode == "bare" else await stack.enter_async_context(database(mode))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            "--role",
            mode,
            "--upstream-url",
            url,
            "--database",
            target,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
            *extra,
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"The {mode} run failed (exit {process.returncode}).")
        return output.decode().strip().splitlines()[-1]


def command_run(url: str, requests: int, concurrency: int) -> Measure:
    """`fusillade run` as a user runs it, on a fresh input file (written first, not timed): wall time from exec
    to exit, and the CPU time of the command (its own and its children's, from `wait4`)."""
    with tempfile.TemporaryDirectory(prefix="fusillade-bench-run-") as directory:
        path = Path(directory, "requests.jsonl")
        with path.open("w") as lines:
            for line in range(1, requests + 1):
                body = json.loads(BODY)
                record = {"custom_id": f"request-{line}", "method": "POST", "url": "/v1/chat/completions"}
                lines.write(json.dumps({**record, "body": body}, separators=(",", ":")) + "\n")
        command = [
            sys.executable,
            "-m",
            "fusillade",
            "run",
            str(path),
            "--model-route",
            f"{MODEL}={url},concurrency={concurrency}",
            "--quiet",
        ]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        error = process.stderr.read().decode() if process.stderr else ""
        if process.returncode != 0:
            raise RuntimeError(f"fusillade run failed (exit {process.returncode}): {error.strip()}")
        output = Path(directory, "requests.output.jsonl")
        with output.open("rb") as written:
            count = sum(1 for _ in written)
        if count != requests:
            raise RuntimeError(f"fusillade run wrote {count} output lines for {requests} requests.")
        return Measure(requests, elapsed, usage.ru_utime + usage.ru_stime)


def child(arguments: argparse.Namespace) -> None:
    # Both sides run as the CLI runs the daemon: on uvloop, with the interpreter tuned (fusillade.runtime).
    install_uvloop()
    runtime.tune_interpreter()
    if arguments.role == "bare":
        elapsed, cpu = asyncio.run(bare_loop(arguments.upstream_url, arguments.requests, arguments.concurrency))
    else:
        elapsed, cpu = asyncio.run(
            daemon_run(
                arguments.upstream_url,
                arguments.database,
                arguments.requests,
                arguments.concurrency,
                arguments.ticks_in_flight,
            )
        )
    print(f"{elapsed:.6f} {cpu:.6f}", flush=True)


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
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--upstream", choices=("nginx", "mock"), default="nginx")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-url", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.role:
        child(arguments)
        return
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine.describe())
    print(
        f"requests per run: {arguments.requests}, concurrency {arguments.concurrency}, runs: {arguments.runs}, "
        f"daemon ticks in flight: {arguments.ticks_in_flight}, upstream: {arguments.upstream}"
    )
    results: dict[str, list[Measure]] = {mode: [] for mode in arguments.modes}
    with nginx_upstream() if arguments.upstream == "nginx" else mock_upstream() as url:
        for _ in range(arguments.runs):
            for mode in arguments.modes:
                results[mode].append(
                    asyncio.run(
                        one_run(mode, url, arguments.requests, arguments.concurrency, arguments.ticks_in_flight)
                    )
                )
    rates = {mode: statistics.median(run.rate for run in runs) for mode, runs in results.items()}
    cpus = {mode: statistics.median(run.cpu_us for run in runs) for mode, runs in results.items()}
    for mode, runs in results.items():
        shares = ""
        if "bare" in results and mode != "bare":
            shares = f" ({rates[mode] / rates['bare']:.2f} of bare)"
        cpu_share = f" ({cpus[mode] / cpus['bare']:.1f}x bare)" if "bare" in results and mode != "bare" else ""
        print(
            f"{mode:>8}: median {rates[mode]:,.0f} requests/s{shares}, {cpus[mode]:,.0f} us CPU per request"
            f"{cpu_share}  (runs: {', '.join(f'{run.rate:,.0f}' for run in runs)}; "
            f"CPU us: {', '.join(f'{run.cpu_us:,.0f}' for run in runs)})"
        )


if __name__ == "__main__":
    main()
