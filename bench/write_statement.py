"""The daemon's write statement alone: how long `apply_writes` takes for a group of `Complete`s (each with its
usage, as the daemon writes them), on a fresh database, without an upstream or an event loop full of calls.
A steadier figure than the whole daemon's rate on a shared machine, for changes to the write path.

    .venv/bin/python bench/write_statement.py [--backend postgres|sqlite] [--group 100] [--groups 250]

Each group is claimed, then completed in one `apply_writes` (timed); the first 20 groups are left out (warm-up:
prepared statements, caches). Reported: the median and mean time per group.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import time

import machine
from fusillade.domain import ids, models
from fusillade.domain.usage import Usage
from fusillade.storage import factory
from queue_throughput import MODEL, RESPONSE, bench_batch, database

WARM_UP = 20


async def measure(backend: str, group: int, groups: int) -> list[float]:
    async with database(backend) as url:
        storage = await factory.open_storage(url)
        try:
            await bench_batch(storage, group * groups)
            info = models.DaemonInfo(hostname="bench", pid=1, version="bench", config={})
            daemon = (await storage.register_daemon(info)).id
            usage = Usage(input_tokens=9, output_tokens=2)
            capacity = [models.ModelCapacity(model=MODEL, free=group, limit=None)]
            times = []
            for _ in range(groups):
                claimed = await storage.claim_requests(daemon, capacity, limit=group)
                writes = [
                    models.Complete(request.id, 200, RESPONSE, models.Spend(*spent_by(request), usage))
                    for request in claimed
                ]
                started = time.perf_counter()
                await storage.apply_writes(daemon, writes)
                times.append(time.perf_counter() - started)
            return times[WARM_UP:]
        finally:
            await storage.close()


def spent_by(request: models.ClaimedRequest) -> tuple[ids.BatchId, str, str]:
    return request.batch_id, request.owner, request.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--group", type=int, default=100, help="Complete writes per apply_writes")
    parser.add_argument("--groups", type=int, default=250)
    arguments = parser.parse_args()
    print("command: python", shlex.join(["bench/write_statement.py", *sys.argv[1:]]))
    print("machine:", machine.describe())
    times = asyncio.run(measure(arguments.backend, arguments.group, max(arguments.groups, WARM_UP + 1)))
    print(
        f"{arguments.backend}: apply_writes of {arguments.group} Completes: median "
        f"{statistics.median(times) * 1e3:.3f} ms, mean {statistics.mean(times) * 1e3:.3f} ms "
        f"({len(times)} groups)"
    )


if __name__ == "__main__":
    main()
