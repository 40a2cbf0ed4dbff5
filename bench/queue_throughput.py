"""Claim + complete throughput of the request queue, on SQLite and PostgreSQL.

Each run uses a fresh database holding one batch of N pending requests (setup, not timed), then drains it
the way a daemon with group commit does, 100 requests per transaction, in one of two modes:

- `claim+complete`: one transaction claims 100 requests, the next completes them (`apply_writes` of 100
  `Complete`): two row writes per request.
- `claim+start+complete`: one transaction claims 100, the next marks those 100 processing and completes the 100
  claimed before: three row writes per request, as a daemon does when calls outlast a commit tick.

With `--workers W`, W such loops run at once, each as its own daemon. Meanwhile the store's queue is
maintained (`maintain_queue`) every `--maintain-interval` seconds, as a daemon does on its maintenance interval
(0: never). The event loop is uvloop's when it is installed, as for the daemon (`fusillade.cli.common.run`);
`--asyncio-loop` runs on asyncio's own. Reported: requests per second (N / drain time), median of `--runs` runs.

    .venv/bin/python bench/queue_throughput.py [--rows 200000] [--runs 3] [--workers 1 4]
        [--backend sqlite] [--mode claim+complete] [--maintain-interval 1.0] [--asyncio-loop]

PostgreSQL: `$FUSILLADE_BENCH_POSTGRES_URL` (a server URL; a scratch database is created and dropped), default
postgresql://postgres@127.0.0.1:5432/postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import asyncpg

import machine
from fusillade.domain import ids, models
from fusillade.storage import base, factory

CLAIM_SIZE = 100
MODEL = "bench-model"
BODY = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
RESPONSE = '{"id":"cmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'  # noqa: E501


def templates(rows: int) -> Iterator[models.TemplateInput]:
    for line in range(1, rows + 1):
        yield models.TemplateInput(
            line_number=line,
            custom_id=f"request-{line}",
            method="POST",
            url="/v1/chat/completions",
            model=MODEL,
            body=BODY,
        )


@asynccontextmanager
async def database(backend: str) -> AsyncIterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="fusillade-bench-") as directory:
            yield f"sqlite:///{directory}/bench.db"
        return
    server = os.environ.get("FUSILLADE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"fusillade_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base_url, _, _ = server.rpartition("/")
        yield f"{base_url}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


MODES = ("claim+complete", "claim+start+complete")


def loop_factory(use_asyncio: bool) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop the runs use (its name, and the factory for `asyncio.Runner`): uvloop's when it is
    installed, as the daemon's, unless asyncio's is asked for."""
    if not use_asyncio:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", None


async def drain(store: base.Storage, daemon_id: ids.DaemonId, mode: str) -> int:
    """Claim and complete until nothing is left; returns requests completed."""
    capacity = [models.ModelCapacity(model=MODEL, free=CLAIM_SIZE)]
    previous: list[models.ClaimedRequest] = []
    done = 0
    while True:
        claimed = await store.claim_requests(daemon_id, capacity, limit=CLAIM_SIZE)
        writes: list[models.RequestWrite]
        if mode == "claim+complete":
            writes = [models.Complete(request.id, 200, RESPONSE) for request in claimed]
            finished = len(claimed)
        else:
            writes = [models.MarkProcessing(request.id) for request in claimed]
            writes += [models.Complete(request.id, 200, RESPONSE) for request in previous]
            finished, previous = len(previous), claimed
        if writes:
            report = await store.apply_writes(daemon_id, writes)
            assert len(report.applied) == len(writes), "a bench write was refused"
        done += finished
        if not claimed:
            return done


async def maintain(store: base.Storage, interval: float, stop: asyncio.Event) -> None:
    """Call `maintain_queue` every `interval` seconds until `stop` is set."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return
        await store.maintain_queue()


async def bench_batch(store: base.Storage, requests: int) -> models.Batch:
    """A batch of `requests` chat completions of `MODEL`, owner `bench` (the benchmarks' set-up, not timed)."""
    upload = await store.create_file(
        owner="bench", filename="bench.jsonl", templates=templates(requests), size_bytes=requests * len(BODY)
    )
    return await store.create_batch(
        models.BatchSpec(owner="bench", input_file_id=upload.id, endpoint="/v1/chat/completions")
    )


async def one_run(backend: str, rows: int, workers: int, mode: str, maintain_interval: float) -> float:
    async with database(backend) as url:
        store = await factory.open_storage(url)
        try:
            batch = await bench_batch(store, rows)
            info = models.DaemonInfo(hostname="bench", pid=os.getpid(), version="bench")
            daemons = [await store.register_daemon(info) for _ in range(workers)]
            stop = asyncio.Event()
            maintenance = (
                [asyncio.create_task(maintain(store, maintain_interval, stop))] if maintain_interval else []
            )
            started = time.perf_counter()
            completed = await asyncio.gather(*(drain(store, daemon.id, mode) for daemon in daemons))
            elapsed = time.perf_counter() - started
            stop.set()
            await asyncio.gather(*maintenance)
            assert sum(completed) == rows, f"completed {sum(completed)} of {rows}"
            final = await store.get_batch(batch.id, owner="bench")
            assert final.counts.completed == rows
            return rows / elapsed
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--maintain-interval", type=float, default=1.0, help="seconds; 0: never")
    parser.add_argument("--asyncio-loop", action="store_true", help="asyncio's event loop, not uvloop's")
    arguments = parser.parse_args()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine.describe()}")
    maintained = (
        f"queue maintained every {arguments.maintain_interval:g} s"
        if arguments.maintain_interval
        else "no maintenance"
    )
    loop_name, new_loop = loop_factory(arguments.asyncio_loop)
    print(
        f"rows per run: {arguments.rows}, {CLAIM_SIZE} requests per transaction, runs: {arguments.runs}, "
        f"{maintained}, {loop_name} event loop"
    )
    for backend in arguments.backend or ["sqlite", "postgres"]:
        for mode in arguments.mode or MODES:
            for workers in arguments.workers:
                rates = []
                for _ in range(arguments.runs):
                    run = one_run(backend, arguments.rows, workers, mode, arguments.maintain_interval)
                    with asyncio.Runner(loop_factory=new_loop) as runner:
                        rates.append(runner.run(run))
                shown = ", ".join(f"{rate:,.0f}" for rate in rates)
                print(
                    f"{backend:>8} {mode:<21} workers {workers}: median {statistics.median(rates):,.0f} "
                    f"requests/s  (runs: {shown})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
