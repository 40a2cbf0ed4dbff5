"""Mixed API load, as a busy team puts on a server, and the completion rate of a running batch meanwhile.

`mixed_load` runs `clients` HTTP clients for `seconds`; each goes round the operations users do most: upload a
file of `upload_lines` requests, create a batch of it, read a batch, list batches and files, download the running
batch's output so far. Every answer is checked (a 5xx is counted, never ignored); latencies are kept per
operation. `CompletionRate` reads a batch's finished count at two moments through the API.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
import orjson

OPERATIONS = ("upload", "create", "read", "list", "download")


def request_lines(count: int, *, model: str, prefix: str) -> bytes:
    """A batch input of `count` small chat completions."""
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"{prefix}-{number}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"question {number}"}]},
            }
        )
        + b"\n"
        for number in range(count)
    )


@dataclass
class LoadReport:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Seconds per answered call, by operation."""
    server_errors: Counter[str] = field(default_factory=Counter)
    """5xx answers (and refused connections), by operation."""

    def count(self, operation: str) -> int:
        return len(self.latencies[operation])

    def percentile(self, operation: str, share: float) -> float:
        values = sorted(self.latencies[operation])
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(share * len(values)))]

    def summary(self) -> str:
        parts = []
        for operation in OPERATIONS:
            values = self.latencies[operation]
            if values:
                parts.append(
                    f"{operation} {len(values)} (p50 {statistics.median(values) * 1000:.0f} ms, "
                    f"p99 {self.percentile(operation, 0.99) * 1000:.0f} ms)"
                )
        return ", ".join(parts)


class Client:
    """One API user: its own uploads and batches, the shared running batch to read and download."""

    def __init__(
        self, http: aiohttp.ClientSession, base: str, key: str, number: int, upload: bytes, watched: str
    ) -> None:
        self._http = http
        self._base = base
        self._headers = {"Authorization": f"Bearer {key}"}
        self._number = number
        self._content = upload
        self._watched = watched
        self._files: list[str] = []
        self._batches: list[str] = []

    async def run(self, until: float, report: LoadReport) -> None:
        for operation in itertools.cycle(OPERATIONS[self._number % len(OPERATIONS) :] + OPERATIONS):
            if time.monotonic() >= until:
                return
            started = time.monotonic()
            try:
                status = await getattr(self, f"_{operation}")()
            except aiohttp.ClientConnectionError:
                report.server_errors[operation] += 1
                continue
            if status >= 500:
                report.server_errors[operation] += 1
            else:
                report.latencies[operation].append(time.monotonic() - started)

    async def _upload(self) -> int:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", self._content, filename=f"load-{self._number}.jsonl")
        async with self._http.post(f"{self._base}/v1/files", data=form, headers=self._headers) as response:
            body = await response.read()
            if response.status == 200:
                self._files.append(orjson.loads(body)["id"])
            return response.status

    async def _create(self) -> int:
        if not self._files:
            return await self._upload()
        document = {
            "input_file_id": self._files.pop(),
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        async with self._http.post(f"{self._base}/v1/batches", json=document, headers=self._headers) as response:
            body = await response.read()
            if response.status == 200:
                self._batches.append(orjson.loads(body)["id"])
            return response.status

    async def _read(self) -> int:
        batch = self._batches[-1] if self._batches else self._watched
        async with self._http.get(f"{self._base}/v1/batches/{batch}", headers=self._headers) as response:
            await response.read()
            return response.status

    async def _list(self) -> int:
        statuses = []
        for path in ("/v1/batches?limit=20", "/v1/files?limit=20"):
            async with self._http.get(f"{self._base}{path}", headers=self._headers) as response:
                await response.read()
                statuses.append(response.status)
        return max(statuses)

    async def _download(self) -> int:
        async with self._http.get(f"{self._base}/v1/batches/{self._watched}", headers=self._headers) as response:
            output = orjson.loads(await response.read()).get("output_file_id")
        if output is None:
            return 200
        url = f"{self._base}/v1/files/{output}/content"
        async with self._http.get(url, headers=self._headers) as response:
            async for _ in response.content.iter_chunked(1 << 16):
                pass
            return response.status


async def mixed_load(
    base: str, key: str, *, watched: str, clients: int, seconds: float, upload_lines: int, model: str
) -> LoadReport:
    """`clients` users for `seconds` (see the module's docstring); `watched` is the running batch they read."""
    report = LoadReport()
    upload = request_lines(upload_lines, model=model, prefix="load")
    until = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        users = [Client(http, base, key, number, upload, watched) for number in range(clients)]
        await asyncio.gather(*(user.run(until, report) for user in users))
    return report


class CompletionRate:
    """Requests of a batch finished per second between `start()` and `stop()`, read through the API."""

    def __init__(self, http: aiohttp.ClientSession, base: str, key: str, batch: str) -> None:
        self._http = http
        self._url = f"{base}/v1/batches/{batch}"
        self._headers = {"Authorization": f"Bearer {key}"}
        self._start: tuple[float, int] | None = None

    async def finished(self) -> int:
        async with self._http.get(self._url, headers=self._headers) as response:
            assert response.status == 200, await response.text()
            counts = orjson.loads(await response.read())["request_counts"]
        return int(counts["completed"]) + int(counts["failed"])

    async def start(self) -> None:
        self._start = (time.monotonic(), await self.finished())

    async def stop(self) -> float:
        assert self._start is not None
        finished = await self.finished()
        started_at, started_count = self._start
        return (finished - started_count) / (time.monotonic() - started_at)
