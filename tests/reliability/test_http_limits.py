"""The HTTP server's own limits (`fusillade.api.server`), against `fusillade serve` as a process, with raw
sockets (asyncio streams) sending what no HTTP client library would: a 50 MB `Authorization` header, 101 header
fields, headers a byte at a time, more connections than allowed. Each is answered (431, 408, 503) or cut off
while the server's memory stays flat and `/healthz` keeps answering.

The server runs in open mode (no keys, loopback), where the headers of a request reach no authentication at
all: the limits hold before any application code runs."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import psutil
import pytest

from tests.support import polling
from tests.support.processes import Process, Processes

pytestmark = pytest.mark.reliability

HEADER_TIMEOUT = 1.0
"""Seconds, `[server] header_timeout` of these tests (the default is 10 s)."""
MAX_CONNECTIONS = 40
HUGE_HEADER = 50 * 1024 * 1024
CHUNK = 1024 * 1024
RSS_GROWTH_BOUND = 40 * 1024 * 1024
"""Four 50 MB headers once grew the server by 400 MB; bounded reading holds at most 64 KiB and a read each."""


@dataclass
class Server:
    process: Process
    url: str

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    def rss(self) -> int:
        """Resident memory of the server, with its child processes if it has any."""
        root = psutil.Process(self.process.pid)
        total = 0
        for process in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    config = tmp_path / "fusillade.toml"
    config.write_text(
        f"""
database_url = "sqlite:///{tmp_path / "fusillade.db"}"

[server]
header_timeout = "{HEADER_TIMEOUT}s"
max_connections = {MAX_CONNECTIONS}
"""
    )
    async with Processes(tmp_path) as fleet:
        process, url = await fleet.serve("--config", str(config))
        yield Server(process, url)


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and body of the one response on a connection the server closes after it."""
    data = await reader.read()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    return int(head.split()[1]), body


async def healthz_times(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    """Seconds each `GET /healthz` took, one after the other, until `stop` (at least one)."""
    times: list[float] = []
    while not stop.is_set() or not times:
        started = time.monotonic()
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
        times.append(time.monotonic() - started)
        await asyncio.sleep(0.02)
    return times


async def huge_header(address: tuple[str, int]) -> tuple[int, bytes]:
    """A GET whose `Authorization` header is 50 MB, sent 1 MB at a time while the answer is read; the answer.
    The server may close before everything is sent: the rest is then not sent."""
    reader, writer = await asyncio.open_connection(*address)

    async def send() -> None:
        writer.write(b"GET /v1/files HTTP/1.1\r\nHost: fusillade\r\nAuthorization: Bearer ")
        for _ in range(HUGE_HEADER // CHUNK):
            writer.write(b"k" * CHUNK)
            await writer.drain()
        writer.write(b"\r\n\r\n")
        await writer.drain()

    sending = asyncio.create_task(send())
    try:
        return await answer(reader)
    finally:
        with contextlib.suppress(ConnectionError):
            await sending
        writer.close()


async def test_four_50_mb_headers_are_refused_431_in_flat_memory_while_healthz_answers(server: Server) -> None:
    before = server.rss()
    peak = before
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, server.rss())
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as http:
        sampling = asyncio.create_task(sample())
        probing = asyncio.create_task(healthz_times(http, server.url, stop))
        try:
            answers = await asyncio.gather(*(huge_header(server.address) for _ in range(4)))
        finally:
            stop.set()
            await sampling
            times = await probing
        async with http.get(f"{server.url}/healthz") as response:
            assert response.status == 200
    for status, body in answers:
        assert status == 431 and b'"code":"request_headers_too_large"' in body, body
    growth = peak - before
    print(f"RSS {before / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB; /healthz max {max(times):.3f} s")
    assert growth < RSS_GROWTH_BOUND, f"the server grew by {growth / 2**20:.0f} MiB"
    assert max(times) < 2.0, times


async def test_too_many_header_fields_and_a_long_request_line_are_refused_431(server: Server) -> None:
    reader, writer = await asyncio.open_connection(*server.address)
    fields = b"".join(b"X-Field-%d: value\r\n" % number for number in range(101))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: fusillade\r\n" + fields + b"\r\n")
    status, body = await answer(reader)
    writer.close()
    assert status == 431 and b"header fields" in body

    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(b"GET /healthz?" + b"q" * 70_000 + b" HTTP/1.1\r\nHost: fusillade\r\n\r\n")
    status, body = await answer(reader)
    writer.close()
    assert status == 431

    reader, writer = await asyncio.open_connection(*server.address)  # just under both limits: served
    fields = b"".join(b"X-Field-%d: %s\r\n" % (number, b"v" * 500) for number in range(98))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: fusillade\r\nConnection: close\r\n" + fields + b"\r\n")
    status, body = await answer(reader)
    writer.close()
    assert status == 200, body


async def test_headers_sent_a_byte_at_a_time_are_cut_off_with_408(server: Server) -> None:
    reader, writer = await asyncio.open_connection(*server.address)
    request = b"GET /healthz HTTP/1.1\r\nHost: fusillade\r\nX-Slow: " + b"s" * 1000 + b"\r\n\r\n"
    started = time.monotonic()

    async def drip() -> None:
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        status, body = await answer(reader)
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dripping
        writer.close()
    elapsed = time.monotonic() - started
    assert status == 408 and b'"code":"request_timeout"' in body
    assert HEADER_TIMEOUT * 0.9 < elapsed < HEADER_TIMEOUT + 3, elapsed

    # A connection that sends nothing at all is cut off too.
    reader, writer = await asyncio.open_connection(*server.address)
    status, _ = await asyncio.wait_for(answer(reader), timeout=HEADER_TIMEOUT + 5)
    writer.close()
    assert status == 408


async def test_connections_over_the_cap_get_503_until_the_silent_ones_are_cut_off(server: Server) -> None:
    idle = [await asyncio.open_connection(*server.address) for _ in range(MAX_CONNECTIONS)]
    try:

        async def refused() -> bool:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: fusillade\r\n\r\n")
            status, body = await answer(reader)
            writer.close()
            assert status in (200, 503), body
            return status == 503 and b'"code":"too_many_connections"' in body

        # The idle connections may not all be accepted yet when the first probe arrives.
        await polling.until(refused, within=HEADER_TIMEOUT, interval=0.01, message="a 503 at the cap")

        async with aiohttp.ClientSession() as http:

            async def served() -> bool:
                async with http.get(f"{server.url}/healthz") as response:
                    return response.status == 200

            # The header timeout frees the silent connections, and the server takes new ones again.
            await polling.until(served, within=HEADER_TIMEOUT + 5, interval=0.1, message="/healthz after the cut")
        for reader, _ in idle:
            status, _ = await answer(reader)
            assert status == 408
    finally:
        for _, writer in idle:
            writer.close()
    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            started = time.monotonic()
            async with http.get(f"{server.url}/healthz") as response:
                statuses.append((response.status, time.monotonic() - started))
    assert {status for status, _ in statuses} == {200}
    assert statistics.median(seconds for _, seconds in statuses) < 0.5
