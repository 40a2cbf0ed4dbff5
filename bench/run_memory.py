"""Peak memory (RSS) of the whole `fusillade run` command on a million requests, against nginx.

The bench writes an input file of `--requests` chat completion lines (one `custom_id` each; ~175 bytes a line,
175 MB at a million; written first, not measured), then each run, on a fresh state (the state database and the
output file of the run before are deleted), runs as a user would

    fusillade run FILE --model-route bench-model=URL,concurrency=C --quiet

with nginx as the upstream (`nginx_upstream.py`, one fixed chat completion for every request) and its state
database next to the input (SQLite, the command's default). Reported: the command's peak RSS (`ru_maxrss` from
`os.wait4`: the largest resident set the process had at any time, start-up, check, ingest, dispatch and the output
file included), its wall time, and the resident set sampled every `--sample-interval` seconds from
`/proc/PID/status` (the largest sample of each tenth of the run: how memory moves over time); the output file is
checked to hold one line per request. Medians of `--runs` runs (2 by default: a run of a million
requests takes 6 to 9 minutes on 2 cores). MB are 10^6 bytes. Goal (issue 15): a peak of at most 300 MB at a
million requests, and no growth with the number of requests (compare `--requests 200000`).

`fusillade run` refuses a file of more than 50,000 lines (`[uploads] max_lines`, docs/configuration.md): the
bench raises the limit as a user would, with the environment variable `FUSILLADE_UPLOADS__MAX_LINES=N` (N: the
number of requests), and `FUSILLADE_UPLOADS__MAX_BYTES` too when the file is larger than the 200 MiB default
(it is not at a million lines); both are printed with the command.

    .venv/bin/python bench/run_memory.py [--requests 1000000] [--concurrency 64] [--runs 2]
        [--sample-interval 0.5]

nginx: `/usr/sbin/nginx` (`apt-get install nginx`) or `$FUSILLADE_BENCH_NGINX`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import machine
from fusillade.domain import jsonl
from nginx_upstream import nginx_upstream
from queue_throughput import BODY, MODEL

SHARES = 10
"""The sampled resident set is shown at each tenth of the run."""


@dataclasses.dataclass(frozen=True, slots=True)
class Measure:
    peak_mb: float
    """`ru_maxrss` of the command."""
    seconds: float
    sampled_mb: list[float]
    """The resident set at each tenth of the run (sampled from /proc)."""


def write_input(path: Path, requests: int) -> int:
    body = json.loads(BODY)
    with path.open("w", encoding="utf-8") as lines:
        for line in range(1, requests + 1):
            record = {"custom_id": f"request-{line}", "method": "POST", "url": "/v1/chat/completions"}
            lines.write(json.dumps({**record, "body": body}, separators=(",", ":")) + "\n")
    return path.stat().st_size


def limits_environment(requests: int, size: int) -> dict[str, str]:
    """The `[uploads]` limits a user would raise to run this file (docs/configuration.md)."""
    environment = {"FUSILLADE_UPLOADS__MAX_LINES": str(max(requests, jsonl.DEFAULT_LIMITS.max_lines))}
    if size > jsonl.DEFAULT_LIMITS.max_bytes:
        environment["FUSILLADE_UPLOADS__MAX_BYTES"] = str(size)
    return environment


def command(path: Path, url: str, concurrency: int) -> list[str]:
    route = f"{MODEL}={url},concurrency={concurrency}"
    return [sys.executable, "-m", "fusillade", "run", str(path), "--model-route", route, "--quiet"]


def resident_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError):
        pass
    return None


def sample(pid: int, interval: float, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    started = time.perf_counter()
    while not stop.wait(interval):
        if (mb := resident_mb(pid)) is not None:
            samples.append((time.perf_counter() - started, mb))


def one_run(path: Path, url: str, requests: int, concurrency: int, interval: float) -> Measure:
    """One `fusillade run` of `path` from a fresh state (the files of the run before are deleted)."""
    for leftover in path.parent.iterdir():
        if leftover != path:
            leftover.unlink()
    environment = {**os.environ, **limits_environment(requests, path.stat().st_size)}
    started = time.perf_counter()
    process = subprocess.Popen(
        command(path, url, concurrency), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment
    )
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(process.pid, interval, stop, samples), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"fusillade run failed (exit {process.returncode}): {error.strip()}")
    with path.with_name("requests.output.jsonl").open("rb") as written:
        count = sum(1 for _ in written)
    if count != requests:
        raise RuntimeError(f"fusillade run wrote {count} output lines for {requests} requests.")
    return Measure(peak_mb=usage.ru_maxrss * 1024 / 1e6, seconds=elapsed, sampled_mb=by_share(samples, elapsed))


def by_share(samples: list[tuple[float, float]], elapsed: float) -> list[float]:
    """The largest sample in each tenth of the run (0 where a tenth had none)."""
    shares = [0.0] * SHARES
    for at, mb in samples:
        share = min(int(at / elapsed * SHARES), SHARES - 1)
        shares[share] = max(shares[share], mb)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between two RSS samples")
    arguments = parser.parse_args()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine.describe())
    results = []
    with tempfile.TemporaryDirectory(prefix="fusillade-bench-memory-") as directory, nginx_upstream() as url:
        path = Path(directory, "requests.jsonl")
        size = write_input(path, arguments.requests)
        environment = limits_environment(arguments.requests, size)
        shown = command(Path(path.name), "URL", arguments.concurrency)
        print(
            f"requests per run: {arguments.requests:,} ({size / 1e6:.0f} MB), runs: {arguments.runs}; each run: "
            + shlex.join([*(f"{name}={value}" for name, value in environment.items()), "fusillade", *shown[3:]])
        )
        for _ in range(arguments.runs):
            results.append(
                one_run(path, url, arguments.requests, arguments.concurrency, arguments.sample_interval)
            )
            run = results[-1]
            print(
                f"  run {len(results)}: peak RSS {run.peak_mb:.0f} MB, {run.seconds:.1f} s "
                f"({arguments.requests / run.seconds:,.0f} requests/s); RSS by tenth of the run (MB): "
                + ", ".join(f"{mb:.0f}" for mb in run.sampled_mb),
                flush=True,
            )
    peak = statistics.median(run.peak_mb for run in results)
    seconds = statistics.median(run.seconds for run in results)
    tenths = [statistics.median(run.sampled_mb[share] for run in results) for share in range(SHARES)]
    print(
        f"median peak RSS {peak:.0f} MB, median {seconds:.1f} s ({arguments.requests / seconds:,.0f} requests/s); "
        f"median RSS by tenth of the run (MB): {', '.join(f'{mb:.0f}' for mb in tenths)}  "
        f"(peaks: {', '.join(f'{run.peak_mb:.0f}' for run in results)} MB)"
    )


if __name__ == "__main__":
    main()
