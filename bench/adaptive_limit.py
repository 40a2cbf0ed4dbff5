"""An adaptive concurrency limit against an upstream of fixed capacity, compared with a fixed limit: the mock
upstream (its own process) serves `--capacity` calls at once, `--latency-ms` each, and above that either refuses
at once with 429 and no Retry-After (`refuse`: a gateway's concurrency cap) or queues the call first come first
served (`queue`: a model server, whose latency grows with load). One daemon (SQLite) drains a batch of
`--requests` chat completions with the model's limit `--ceiling`, adaptive or fixed.

Reported per mode, medians of `--runs` runs: the rate as a share of the ideal (capacity / latency), the share of
the calls refused with 429, the latency of successful calls after the first 10% of them (the warm-up) as a
multiple of the unloaded latency (median, mean and 90th percentile), the limit (median of samples every 50 ms),
and requests that ended failed.

    .venv/bin/python bench/adaptive_limit.py [--requests 2000] [--capacity 8] [--latency-ms 100] [--ceiling 64]
        [--runs 3] [--modes refuse queue] [--limits adaptive fixed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import machine
from daemon_throughput import mock_upstream
from fusillade.daemon.daemon import Daemon
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import models
from fusillade.storage import factory
from fusillade.upstream import outcome as outcomes
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from queue_throughput import MODEL, bench_batch


@dataclass
class Timed:
    """The daemon's upstream client, timing every call it makes (the benchmark's own instrument)."""

    client: UpstreamClient
    calls: list[tuple[float, float, bool]] = field(default_factory=list)
    """(when it ended, how long it took, whether it succeeded) of each call."""

    async def send(
        self,
        request: models.ClaimedRequest,
        route: Route,
        *,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> outcomes.Outcome:
        started = time.perf_counter()
        result = await self.client.send(request, route, headers=headers, deadline=deadline)
        ended = time.perf_counter()
        self.calls.append((ended, ended - started, isinstance(result, outcomes.Success)))
        return result


@dataclass
class Run:
    rate: float
    refused_share: float
    latency_median: float
    latency_mean: float
    latency_p90: float
    limit_median: float
    failed: int


async def one_run(url: str, requests: int, ceiling: int, adaptive: bool, unloaded: float) -> Run:
    with tempfile.TemporaryDirectory() as directory:
        storage = await factory.open_storage(f"sqlite:///{Path(directory) / 'bench.db'}")
        try:
            batch = await bench_batch(storage, requests)
            async with UpstreamClient() as client:
                timed = Timed(client)
                route = Route(base_url=url, api_key="bench", concurrency=ceiling, adaptive=adaptive)
                daemon = Daemon(
                    storage,
                    timed,
                    {MODEL: route},
                    settings=DaemonSettings(purge_interval=None, maintenance_interval=timedelta(seconds=1)),
                )
                limits: list[int] = []
                started = time.perf_counter()
                task = asyncio.create_task(daemon.run())
                while True:
                    await asyncio.sleep(0.05)
                    limits.append(daemon.metrics.limits.source().get(MODEL, 0))
                    if task.done():
                        task.result()
                        raise RuntimeError("The daemon stopped before the batch finished.")
                    if len(limits) % 10 == 0:
                        counts = (await storage.get_batch(batch.id, owner=models.ALL_OWNERS)).counts
                        if counts.completed + counts.failed >= requests:
                            break
                elapsed = time.perf_counter() - started
                daemon.stop()
                await task
        finally:
            await storage.close()
    stats = await asyncio.to_thread(upstream_stats, url)
    calls = sum(stats["responses_by_status"].values())
    refused = stats["responses_by_status"].get("429", 0)
    successes = [took for _, took, succeeded in sorted(timed.calls) if succeeded]
    steady = sorted(successes[len(successes) // 10 :]) or [0.0]
    return Run(
        rate=counts.completed / elapsed,
        refused_share=refused / calls if calls else 0.0,
        latency_median=statistics.median(steady) / unloaded,
        latency_mean=statistics.mean(steady) / unloaded,
        latency_p90=steady[int(len(steady) * 0.9)] / unloaded,
        limit_median=statistics.median(limits),
        failed=counts.failed,
    )


def upstream_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stats") as answer:
        stats: dict[str, Any] = json.load(answer)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--ceiling", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=["refuse", "queue"], default=["refuse", "queue"])
    parser.add_argument("--limits", nargs="+", choices=["adaptive", "fixed"], default=["adaptive", "fixed"])
    arguments = parser.parse_args()
    unloaded = arguments.latency_ms / 1000
    ideal = arguments.capacity / unloaded
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine.describe()}")
    print(
        f"requests per run: {arguments.requests}, upstream capacity {arguments.capacity} at "
        f"{arguments.latency_ms:g} ms (ideal {ideal:g} requests/s), limit ceiling {arguments.ceiling}, "
        f"runs: {arguments.runs}"
    )
    for mode in arguments.modes:
        for kind in arguments.limits:
            runs = []
            for _ in range(arguments.runs):
                with mock_upstream(
                    "--capacity",
                    str(arguments.capacity),
                    "--over-capacity",
                    mode,
                    "--latency-ms",
                    str(arguments.latency_ms),
                    "--retry-after-s",
                    "none",
                ) as url:
                    runs.append(
                        asyncio.run(
                            one_run(url, arguments.requests, arguments.ceiling, kind == "adaptive", unloaded)
                        )
                    )

            def median(name: str, runs: list[Run] = runs) -> float:
                return statistics.median(getattr(run, name) for run in runs)

            print(
                f"{mode:>6} {kind:>8}: {median('rate'):5.1f} requests/s ({median('rate') / ideal:.0%} of ideal), "
                f"429s {median('refused_share'):.1%} of calls, latency x unloaded: median "
                f"{median('latency_median'):.2f}, mean {median('latency_mean'):.2f}, "
                f"p90 {median('latency_p90'):.2f}; "
                f"limit median {median('limit_median'):g}; failed {median('failed'):g}  "
                f"(rates: {', '.join(f'{run.rate:.1f}' for run in runs)})"
            )


if __name__ == "__main__":
    main()
