"""`requests_per_minute` held by several daemons on one PostgreSQL database (issue 17's acceptance): `--daemons`
daemons (each with a store and pool of its own, in this process) drain a batch against the mock upstream (its own
process) with the model's rate `--rpm` and a concurrency far above what the rate needs. The daemons' client notes
when each call is sent.

Reported: the calls of each whole minute after the first second against the rate (within 10 % is the bar), and
the busiest second after the first against the per-second rate (1.5x is the bar), the calls each daemon sent.

    .venv/bin/python bench/rate_limit.py [--rpm 1200] [--minutes 1] [--daemons 3] [--backend postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import shlex
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import machine
from daemon_throughput import mock_upstream
from fusillade.daemon.daemon import Daemon
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import models
from fusillade.storage import base, factory
from fusillade.upstream import outcome as outcomes
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route
from queue_throughput import MODEL, bench_batch, database


@dataclass
class Sent:
    """The daemons' upstream client, noting when each call was sent and by which daemon."""

    client: UpstreamClient
    calls: list[tuple[float, str]] = field(default_factory=list)

    async def send(
        self,
        request: models.ClaimedRequest,
        route: Route,
        *,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> outcomes.Outcome:
        self.calls.append((time.perf_counter(), str(request.daemon_id)))
        return await self.client.send(request, route, headers=headers, deadline=deadline)


def busiest_second(times: list[float], start: float) -> int:
    later = times[bisect.bisect_left(times, start) :]
    counts = (bisect.bisect_left(later, opening + 1.0) - index for index, opening in enumerate(later))
    return max(counts, default=0)


async def run(url: str, backend: str, rpm: int, minutes: int, daemons: int) -> None:
    requests = rpm * minutes + rpm // 30  # the whole measured span, the first second and a margin
    async with database(backend) as database_url:
        stores: list[base.Storage] = [await factory.open_storage(database_url) for _ in range(daemons)]
        try:
            await stores[0].migrate()
            batch = await bench_batch(stores[0], requests)
            async with UpstreamClient() as client:
                sent = Sent(client)
                routes = {MODEL: Route(base_url=url, api_key="bench", concurrency=256, requests_per_minute=rpm)}
                settings = DaemonSettings(purge_interval=None, maintenance_interval=timedelta(seconds=1))
                running = [Daemon(store, sent, routes, settings=settings) for store in stores]
                tasks = [asyncio.create_task(daemon.run()) for daemon in running]
                while True:
                    await asyncio.sleep(0.5)
                    for task in tasks:
                        if task.done():
                            task.result()
                            raise RuntimeError("A daemon stopped before the batch finished.")
                    counts = (await stores[0].get_batch(batch.id, owner=models.ALL_OWNERS)).counts
                    if counts.completed + counts.failed >= requests:
                        break
                for daemon in running:
                    daemon.stop()
                await asyncio.gather(*tasks)
        finally:
            for store in stores:
                await store.close()
    times = sorted(when for when, _ in sent.calls)
    first = times[0]
    per_second = rpm / 60
    for minute in range(minutes):
        start = first + 1.0 + 60.0 * minute
        calls = bisect.bisect_left(times, start + 60.0) - bisect.bisect_left(times, start)
        print(f"minute {minute + 1}: {calls} calls for a rate of {rpm} ({calls / rpm - 1:+.1%})")
    busiest = busiest_second(times, first + 1.0)
    print(
        f"busiest second after the first: {busiest} calls, {busiest / per_second:.2f}x the per-second rate "
        f"({per_second:g}); calls in the first second: {bisect.bisect_left(times, first + 1.0)}"
    )
    by_daemon = Counter(daemon for _, daemon in sent.calls)
    print(f"calls per daemon: {sorted(by_daemon.values(), reverse=True)}; failed: {counts.failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=1200)
    parser.add_argument("--minutes", type=int, default=1)
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    arguments = parser.parse_args()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine.describe()}")
    print(f"{arguments.daemons} daemons on {arguments.backend}, {arguments.rpm} requests a minute")
    with mock_upstream() as url:
        asyncio.run(run(url, arguments.backend, arguments.rpm, arguments.minutes, arguments.daemons))


if __name__ == "__main__":
    main()
