"""Requests per second of fusillade against a slow upstream (a fixed latency per request, as a model server
has), compared in the same run with a bare aiohttp loop at the same concurrency, and with the ideal.

Here the upstream's latency, not the client's CPU, sets the pace: C requests in flight that each take L
seconds give at most C / L requests per second (256 / 100 ms: 2,560/s). What a client loses comes from the
time a freed slot stays empty before its next request is sent. The upstream is the Python mock (`python -m
fusillade.mock_upstream --latency-ms L --no-track-custom-ids`). Modes:
- `bare`: one process sends N chat completion POSTs with C concurrent workers over one aiohttp session
  (`daemon_throughput.bare_loop`'s set-up), each worker sending its next request as soon as one is answered;
- `sqlite` / `postgres`: a fresh database holds one batch of N requests (setup, not timed); one daemon process
  (default settings, model limit C) drains it, its progress sampled every 10 ms from its own counters.
Both sides run on uvloop with `fusillade.runtime.tune_interpreter()`, as the CLI does, each run in a fresh
process. Reported: the STEADY rate, completions per second between 10% and 90% of the requests done (start-up
and the draining tail left out), as a share of the ideal C / L and of the bare loop's; over the same stretch,
the process's CPU time per request (all its threads) and the share of the time its event loop's thread was busy
(its own CPU time over the wall time: near 100%, the loop is the bottleneck, whatever the upstream's pace); and
the whole run's rate (N over the time to the last request). Each mode runs `--runs` times, interleaved; medians.

    .venv/bin/python bench/latency_bound.py [--requests 20000] [--concurrency 256] [--latency-ms 100]
        [--runs 3] [--modes bare sqlite postgres]

PostgreSQL: `$FUSILLADE_BENCH_POSTGRES_URL` (a server URL; a scratch database is created and dropped), default
postgresql://postgres@127.0.0.1:5432/postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import machine
from daemon_throughput import child_output, finished_requests, install_uvloop, mock_upstream
from fusillade import runtime
from fusillade.daemon import Daemon, DaemonSettings
from fusillade.domain import models
from queue_throughput import BODY, MODEL, bench_batch

HERE = Path(__file__).resolve()
MODES = ("bare", "sqlite", "postgres")
SAMPLE_INTERVAL = 0.01
STEADY_FROM, STEADY_TO = 0.1, 0.9


Sample = tuple[float, float, float, float]
"""(time, requests done, CPU time of the process, CPU time of its main thread: the event loop's), in seconds."""


def sample(done: float) -> Sample:
    return time.perf_counter(), done, time.process_time(), time.thread_time()


@dataclasses.dataclass(frozen=True)
class Measure:
    """One run: the steady rate, the CPU microseconds per request over the same stretch and the share of it the
    event loop's thread was busy, the whole run's rate."""

    steady: float
    cpu_us: float
    loop_busy: float
    whole: float

    @classmethod
    def of(cls, progress: Sequence[Sample], requests: int) -> Measure:
        """From `progress`, in time order: the time each share of `requests` was reached is interpolated
        between two samples, the CPU times are those of the first sample past it."""

        def reached(count: float) -> tuple[float, float, float]:
            previous = progress[0]
            for current in progress:
                if current[1] >= count:
                    (t0, c0, _, _), (t1, c1, cpu, loop) = previous, current
                    return (t1 if c1 == c0 else t0 + (t1 - t0) * (count - c0) / (c1 - c0)), cpu, loop
                previous = current
            raise ValueError(f"Only {progress[-1][1]:.0f} requests done, not {count:.0f}.")

        low, high = requests * STEADY_FROM, requests * STEADY_TO
        (start, cpu_start, loop_start), (end, cpu_end, loop_end) = reached(low), reached(high)
        return cls(
            steady=(high - low) / (end - start),
            cpu_us=(cpu_end - cpu_start) / (high - low) * 1e6,
            loop_busy=(loop_end - loop_start) / (end - start),
            whole=requests / (progress[-1][0] - progress[0][0]),
        )


# ------------------------------------------------------------------------------------------- the two sides


async def bare_loop(url: str, requests: int, concurrency: int) -> Measure:
    """`daemon_throughput.bare_loop`, each completion's time recorded."""
    import aiohttp

    remaining = iter(range(requests))
    body = BODY.encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    progress: list[Sample] = []

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
                progress.append(sample(len(progress)))

        progress.append(sample(0.0))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Measure.of(progress, requests)


async def daemon_run(url: str, database_url: str, requests: int, concurrency: int) -> Measure:
    """One daemon (default settings) drains a batch of `requests`, its progress sampled from its counters."""
    from fusillade.storage import factory
    from fusillade.storage.base import WritePriority
    from fusillade.upstream.client import UpstreamClient
    from fusillade.upstream.routes import Route

    storage = await factory.open_storage(database_url, write_priority=WritePriority.HIGH)
    try:
        batch = await bench_batch(storage, requests)
        async with UpstreamClient() as client:
            daemon = Daemon(
                storage,
                client,
                {MODEL: Route(base_url=url, api_key="bench", concurrency=concurrency)},
                settings=DaemonSettings(purge_interval=None),
            )
            progress: list[Sample] = [sample(0.0)]
            task = asyncio.create_task(daemon.run())
            while progress[-1][1] < requests:
                await asyncio.sleep(SAMPLE_INTERVAL)
                progress.append(sample(finished_requests(daemon)))
                if task.done():
                    task.result()
                    raise RuntimeError("The daemon stopped before the batch finished.")
            current = await storage.get_batch(batch.id, owner=models.ALL_OWNERS)
            if current.counts.completed != requests:
                raise RuntimeError(f"Only {current.counts.completed} of {requests} requests completed.")
            daemon.stop()
            await task
            return Measure.of(progress, requests)
    finally:
        await storage.close()


# ------------------------------------------------------------------------------------------ harness


async def one_run(mode: str, url: str, requests: int, concurrency: int) -> Measure:
    """Run one measurement in a fresh process."""
    output = await child_output(HERE, mode, url, requests, concurrency)
    return Measure(**json.loads(output))


def child(arguments: argparse.Namespace) -> None:
    install_uvloop()
    runtime.tune_interpreter()
    if arguments.role == "bare":
        measure = asyncio.run(bare_loop(arguments.upstream_url, arguments.requests, arguments.concurrency))
    else:
        measure = asyncio.run(
            daemon_run(arguments.upstream_url, arguments.database, arguments.requests, arguments.concurrency)
        )
    print(json.dumps(dataclasses.asdict(measure)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-url", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.role:
        child(arguments)
        return
    ideal = arguments.concurrency / (arguments.latency_ms / 1000)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine.describe())
    print(
        f"requests per run: {arguments.requests}, concurrency {arguments.concurrency}, upstream latency "
        f"{arguments.latency_ms:g} ms (ideal {ideal:,.0f} requests/s), runs: {arguments.runs}; steady: "
        f"{STEADY_FROM:.0%} to {STEADY_TO:.0%} of the requests done"
    )
    results: dict[str, list[Measure]] = {mode: [] for mode in arguments.modes}
    with mock_upstream("--latency-ms", f"{arguments.latency_ms:g}") as url:
        for _ in range(arguments.runs):
            for mode in arguments.modes:
                results[mode].append(asyncio.run(one_run(mode, url, arguments.requests, arguments.concurrency)))
    steady = {mode: statistics.median(run.steady for run in runs) for mode, runs in results.items()}
    for mode, runs in results.items():
        whole = statistics.median(run.whole for run in runs)
        cpu = statistics.median(run.cpu_us for run in runs)
        busy = statistics.median(run.loop_busy for run in runs)
        share = f", {steady[mode] / steady['bare']:.3f} of bare" if "bare" in results and mode != "bare" else ""
        rates = ", ".join(f"{run.steady:,.0f}" for run in runs)
        cpus = ", ".join(f"{run.cpu_us:,.0f}" for run in runs)
        print(
            f"{mode:>8}: steady median {steady[mode]:,.0f} requests/s "
            f"({steady[mode] / ideal:.3f} of ideal{share}), {cpu:,.0f} us CPU per request, "
            f"event loop busy {busy:.0%}; "
            f"whole run {whole:,.0f}/s  (steady runs: {rates}; CPU us: {cpus})"
        )


if __name__ == "__main__":
    main()
