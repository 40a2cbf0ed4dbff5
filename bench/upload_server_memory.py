"""Peak memory of `fusillade serve` while a 200 MB file is uploaded to it (`POST /v1/files`).

A file of `--lines` request lines of about `--megabytes` in total (`upload_memory.py`'s generator) is written
once to a temporary folder. Each run starts `fusillade serve` as a subprocess on a fresh database (SQLite in
the temporary folder, or a scratch PostgreSQL database, created and dropped) with a configuration that routes
the file's model, waits for `/readyz`, then uploads the file as multipart/form-data (`purpose=batch`) with
aiohttp streaming it from disk, while a thread samples the server process's RSS (psutil) every 10 ms. After
the upload, before the server is stopped, `VmHWM` of /proc/<pid>/status gives the kernel's high-water mark of
its RSS (over the process's whole life, start-up included). Reported per backend, medians of `--runs` runs:
RSS before the upload, peak RSS sampled during it, RSS after it, VmHWM, wall time of the upload; every upload
must answer 200. Goal: peak RSS under 200 MB.

`--one-line`: the file is a single request line of about `--megabytes` (its body one long message), larger
than the per-line limit (`[uploads] max_line_bytes`, kept at its default) but within the file limit: the server
must refuse it (400) while holding no more of it than that limit. Goal: peak RSS under 200 MB there too.

    .venv/bin/python bench/upload_server_memory.py [--megabytes 200] [--lines 50000] [--runs 3]
        [--backend sqlite] [--one-line]

PostgreSQL: `$FUSILLADE_BENCH_POSTGRES_URL` (a server URL; a scratch database is created and dropped), default
postgresql://postgres@127.0.0.1:5432/postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp
import psutil

import machine
from fusillade.domain import jsonl
from upload_memory import drop_database, scratch_database, write_input

MODEL = "bench-model"  # the model of upload_memory.write_input's lines
SAMPLE_INTERVAL_S = 0.01
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
LISTENING = re.compile(r"Listening on (http://\S+) \(")


@dataclass(frozen=True)
class Result:
    status: int
    seconds: float
    rss_before: int
    rss_peak: int
    rss_after: int
    """RSS once the upload has been answered (what the server keeps)."""
    vm_hwm: int
    samples: int


class RssSampler:
    """A thread reading a process's RSS every `SAMPLE_INTERVAL_S` until stopped; `peak` is the largest seen."""

    def __init__(self, process: psutil.Process) -> None:
        self._process = process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = 0
        self.samples = 0

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._process.memory_info().rss)
            self.samples += 1
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return


def vm_hwm_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's RSS (`VmHWM`, in kB in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def write_one_line(path: Path, megabytes: int) -> int:
    """One request line of about `megabytes` MB (valid JSON: one long message)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (megabytes * 1_000_000)}]}
    line = {"custom_id": "one-long-line", "method": "POST", "url": "/v1/chat/completions", "body": body}
    path.write_bytes(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    return path.stat().st_size


def write_config(path: Path, database_url: str, spool: Path, size: int, lines: int) -> None:
    # json.dumps writes a valid TOML basic string for these (ASCII) values.
    path.write_text(
        f"database_url = {json.dumps(database_url)}\n"
        '[server]\nhost = "127.0.0.1"\nport = 0\n'
        f"[uploads]\nmax_lines = {max(lines, jsonl.DEFAULT_LIMITS.max_lines)}\n"
        f"max_bytes = {max(size, jsonl.DEFAULT_LIMITS.max_bytes)}\nspool_directory = {json.dumps(str(spool))}\n"
        f'[models."{MODEL}"]\nbase_url = "http://127.0.0.1:9/v1"\n',  # never called: no batch is created
        encoding="utf-8",
    )


def start_server(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`fusillade serve` on a free port; the process and its base URL once `/readyz` answers 200."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "fusillade", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fusillade serve exited with {process.returncode}:\n{log.read_text()}")
        if url is None and (found := LISTENING.search(log.read_text())):
            url = found.group(1)
        if url is not None and asyncio.run(is_ready(url)):
            return process, url
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"fusillade serve was not ready within {START_TIMEOUT_S:g} s:\n{log.read_text()}")


async def is_ready(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def upload(url: str, source: BinaryIO, filename: str) -> tuple[int, dict[str, object]]:
    """POST the file to /v1/files, streamed from `source` in chunks by aiohttp (never read whole)."""
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", source, filename=filename, content_type="application/jsonl")
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{url}/v1/files", data=form) as response,
    ):
        return response.status, await response.json(content_type=None)


def one_run(backend: str, directory: Path, source: Path, lines: int, expected: int = 200) -> Result:
    size = source.stat().st_size
    database_url, scratch = scratch_database(backend, directory)
    config, log = directory / "fusillade.toml", directory / "serve.log"
    write_config(config, database_url, directory, size, lines)
    try:
        process, url = start_server(config, log)
        try:
            server = psutil.Process(process.pid)
            before = server.memory_info().rss
            with source.open("rb") as file, RssSampler(server) as sampler:
                started = time.perf_counter()
                status, body = asyncio.run(upload(url, file, source.name))
                seconds = time.perf_counter() - started
            after = server.memory_info().rss
            hwm = vm_hwm_bytes(process.pid)
        finally:
            stop_server(process)
    finally:
        drop_database(scratch)
    if status != expected or (status == 200 and body.get("bytes") != size):
        raise RuntimeError(f"the upload answered {status}: {json.dumps(body)[:2000]}\n{log.read_text()[-2000:]}")
    return Result(status, seconds, before, max(sampler.peak, before), after, hwm, sampler.samples)


def megabytes(value: float) -> str:
    return f"{value / 1e6:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--one-line", action="store_true", help="one line of --megabytes, over the line limit")
    parser.add_argument("--expect", type=int, default=None, help="the HTTP status every upload must answer")
    arguments = parser.parse_args()
    expected = arguments.expect or (400 if arguments.one_line else 200)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine.describe()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fusillade-upload-server-") as folder:
        directory = Path(folder)
        source = directory / "input.jsonl"
        if arguments.one_line:
            size, lines = write_one_line(source, arguments.megabytes), 1
        else:
            size, lines = write_input(source, arguments.megabytes, arguments.lines), arguments.lines
        print(f"input: {lines} lines, {size / 1e6:.1f} MB; runs: {arguments.runs}", flush=True)
        for backend in arguments.backend or ["sqlite", "postgres"]:
            results = []
            for _ in range(arguments.runs):
                with tempfile.TemporaryDirectory(dir=directory) as run_folder:
                    results.append(one_run(backend, Path(run_folder), source, lines, expected))
            peak = statistics.median(result.rss_peak for result in results)
            hwm = statistics.median(result.vm_hwm for result in results)
            before = statistics.median(result.rss_before for result in results)
            after = statistics.median(result.rss_after for result in results)
            seconds = statistics.median(result.seconds for result in results)
            statuses = ", ".join(str(result.status) for result in results)
            print(
                f"{backend:>8}: median peak RSS {megabytes(peak)} MB sampled, VmHWM {megabytes(hwm)} MB "
                f"(before the upload {megabytes(before)} MB, after {megabytes(after)} MB); "
                f"median upload {seconds:.1f} s = {size / 1e6 / seconds:.0f} MB/s; HTTP {statuses}\n"
                f"          runs: peaks {', '.join(megabytes(result.rss_peak) for result in results)} MB, "
                f"VmHWM {', '.join(megabytes(result.vm_hwm) for result in results)} MB, "
                f"before {', '.join(megabytes(result.rss_before) for result in results)} MB, "
                f"{', '.join(f'{result.seconds:.1f}' for result in results)} s, "
                f"{min(result.samples for result in results)}+ RSS samples each",
                flush=True,
            )
    client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"client (this process, streaming the file from disk): peak RSS {megabytes(client_peak)} MB")


if __name__ == "__main__":
    main()
