"""CPU per request of passing bodies on as written: the upload validator per line, and a streaming route's body
per send (fields spliced into the user's bytes) against the re-serialising way it replaced (parse the body, set
the fields, write it again).

    .venv/bin/python bench/request_bodies.py [--lines 50000] [--runs 5]

Lines are chat completions of about 800 bytes (two messages); every figure is the median of `--runs` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import orjson

import machine
from fusillade.domain import jsonl
from fusillade.upstream.stream_request import streaming_body


def chat_line(number: int) -> bytes:
    body = {
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "You are helpful. " * 10},
            {"role": "user", "content": f"Tell me about item {number}. " * 20},
        ],
    }
    return orjson.dumps(
        {"custom_id": f"req-{number}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def reserialised(body: bytes) -> bytes:
    """The way before: the body parsed, the stream fields set, the whole written again."""
    document = orjson.loads(body)
    document["stream"] = True
    options = document.get("stream_options")
    document["stream_options"] = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    return orjson.dumps(document)


def median_seconds(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine.describe()}")
    lines = [chat_line(number) for number in range(arguments.lines)]
    data = b"\n".join(lines) + b"\n"
    limits = jsonl.Limits(max_lines=arguments.lines)

    async def validate() -> int:
        count = 0
        async for _ in jsonl.validate(jsonl.iterate_chunks(data, 1 << 20), limits):
            count += 1
        return count

    validation = median_seconds(arguments.runs, lambda: asyncio.run(validate()))
    bodies = [line[line.index(b'"body":') + 7 : -1] for line in lines]
    spliced = median_seconds(arguments.runs, lambda: [streaming_body(body, usage=True) for body in bodies])
    rewritten = median_seconds(arguments.runs, lambda: [reserialised(body) for body in bodies])
    per_line = 1e6 / arguments.lines
    print(f"input: {arguments.lines} lines, {len(data) / 1e6:.1f} MB; runs: {arguments.runs}")
    print(f"validator: {validation * per_line:.2f} us per line ({len(data) / 1e6 / validation:.0f} MB/s)")
    print(
        f"streaming body per send: spliced {spliced * per_line:.2f} us, "
        f"re-serialised {rewritten * per_line:.2f} us"
    )


if __name__ == "__main__":
    main()
