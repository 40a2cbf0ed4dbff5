"""Peak memory of validating and storing a large input file (200 MB, 50,000 lines by default).

A file of `--lines` request lines of about `--megabytes` in total is written to a temporary folder; then, for
each backend, a fresh Python process streams it from disk in 1 MiB chunks through the JSONL validator into
`FileStore.create_file` and reports its own peak RSS (`ru_maxrss`). Goal: peak RSS under 150 MB.

    .venv/bin/python bench/upload_memory.py [--megabytes 200] [--lines 50000] [--runs 3] [--backend sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import machine

CHUNK_BYTES = 1 << 20


def write_input(path: Path, megabytes: int, lines: int) -> int:
    per_line = megabytes * 1_000_000 // lines
    filler = "x" * max(per_line - 150, 1)
    with path.open("w", encoding="utf-8") as output:
        for number in range(1, lines + 1):
            body = {"model": "bench-model", "messages": [{"role": "user", "content": filler}]}
            line = {"custom_id": f"r-{number}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            output.write(json.dumps(line, separators=(",", ":")) + "\n")
    return path.stat().st_size


async def read_chunks(path: Path) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    with path.open("rb") as source:
        while chunk := await loop.run_in_executor(None, source.read, CHUNK_BYTES):
            yield chunk


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def child(url: str, path: Path) -> dict[str, float]:
    from fusillade.domain import jsonl
    from fusillade.storage import factory

    size_bytes = path.stat().st_size  # noqa: ASYNC240 - one stat before the timed part
    store = await factory.open_storage(url)
    try:
        before = peak_rss_bytes()
        started = time.perf_counter()
        stored = await store.create_file(
            owner="bench",
            filename=path.name,
            templates=jsonl.validate(read_chunks(path), jsonl.Limits()),
            size_bytes=size_bytes,
        )
        elapsed = time.perf_counter() - started
        assert stored.request_count > 0
        return {
            "requests": stored.request_count,
            "seconds": elapsed,
            "rss_before": before,
            "rss_peak": peak_rss_bytes(),
        }
    finally:
        await store.close()


def scratch_database(backend: str, directory: Path) -> tuple[str, str | None]:
    if backend == "sqlite":
        return f"sqlite:///{directory}/upload-{uuid.uuid4().hex[:8]}.db", None
    server = os.environ.get("FUSILLADE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"fusillade_bench_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", server, "-qc", f'CREATE DATABASE "{name}"'], check=True)
    return f"{server.rpartition('/')[0]}/{name}", name


def drop_database(name: str | None) -> None:
    if name is not None:
        server = os.environ.get("FUSILLADE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
        subprocess.run(["psql", server, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--child", nargs=2, metavar=("URL", "PATH"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        url, path = arguments.child
        print(json.dumps(asyncio.run(child(url, Path(path)))))
        return
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine.describe()}")
    with tempfile.TemporaryDirectory(prefix="fusillade-upload-") as folder:
        directory = Path(folder)
        source = directory / "input.jsonl"
        size = write_input(source, arguments.megabytes, arguments.lines)
        print(f"input: {arguments.lines} lines, {size / 1e6:.1f} MB; runs: {arguments.runs}")
        for backend in arguments.backend or ["sqlite", "postgres"]:
            results = []
            for _ in range(arguments.runs):
                url, name = scratch_database(backend, directory)
                try:
                    finished = subprocess.run(
                        [sys.executable, __file__, "--child", url, str(source)],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                finally:
                    drop_database(name)
                results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
            peak = statistics.median(result["rss_peak"] for result in results) / 1e6
            before = statistics.median(result["rss_before"] for result in results) / 1e6
            seconds = statistics.median(result["seconds"] for result in results)
            print(
                f"{backend:>8}: median peak RSS {peak:.0f} MB (after start-up {before:.0f} MB), "
                f"median {seconds:.1f} s = {size / 1e6 / seconds:.0f} MB/s; "
                f"peaks: {', '.join(str(round(result['rss_peak'] / 1e6)) for result in results)} MB"
            )


if __name__ == "__main__":
    main()
