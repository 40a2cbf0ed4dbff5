"""`fusillade serve` as two processes (`fusillade.composition.supervision`): the API here, the daemon in a child
it supervises.

- The daemon runs in its own process, at a higher CPU priority than the API, and an upload in the API wakes it at
  once (not at its idle poll).
- A killed daemon process is started again and the batch completes; serve stays up.
- A daemon process that dies again and again right after its start stops serve with exit code 1: never half
  alive.
- serve killed with SIGKILL takes its daemon process with it.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from fusillade.mock_upstream import Behaviour, MockUpstream, UniformLatency
from tests.reliability.mixed_load import request_lines
from tests.support import polling
from tests.support.processes import Process, Processes

pytestmark = pytest.mark.reliability

CHILD_STARTED = re.compile(r"Daemon process (\d+) started")


def config(tmp_path: Path, upstream: str, *, idle_poll: str = "60s") -> str:
    """The daemon's idle poll is a minute: only the API's wake-up can start a batch sooner."""
    return f"""database_url = "sqlite:///{tmp_path}/serve.db"

[daemon]
idle_poll_interval = "{idle_poll}"
heartbeat_interval = "500ms"
stale_after = "3s"
maintenance_interval = "200ms"

[models."model-a"]
base_url = "{upstream}"
concurrency = 4
"""


def children(process: Process) -> list[int]:
    """The daemon processes serve said it started, in order."""
    return [int(pid) for pid in CHILD_STARTED.findall(process.log_text())]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def niceness(pid: int) -> int:
    """The nice value of the main thread of `pid` (field 19 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


async def upload_and_create(sdk: AsyncOpenAI, count: int) -> str:
    uploaded = await sdk.files.create(
        file=("in.jsonl", request_lines(count, model="model-a", prefix="r")), purpose="batch"
    )
    batch = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def test_the_daemon_runs_in_its_own_process_and_the_api_wakes_it(tmp_path: Path) -> None:
    async with MockUpstream(Behaviour()) as upstream, Processes(tmp_path) as processes:
        (tmp_path / "fusillade.toml").write_text(config(tmp_path, upstream.url))
        server, url = await processes.serve("--config", "fusillade.toml")
        await server.registered()
        [child] = children(server)
        assert child != server.pid and alive(child)
        # The API's main thread runs `[server] api_niceness` (5) below the daemon process.
        assert (niceness(server.pid), niceness(child)) == (5, 0)

        _, status, _ = await processes.cli("status", "--json", "--config", "fusillade.toml")
        assert [daemon["pid"] for daemon in json.loads(status)["daemons"]] == [child]

        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="local") as sdk:
            await upload_and_create(sdk, 3)
            # Well before the daemon's idle poll (60 s): the API's wake-up reached the other process.
            await polling.until(lambda: upstream.stats.requests_total == 3, within=10, message="the batch sent")
    assert processes.started[0].popen.returncode == 0


async def test_a_killed_daemon_process_is_started_again_and_the_batch_completes(tmp_path: Path) -> None:
    async with (
        MockUpstream(Behaviour(latency=UniformLatency(0.05, 0.1))) as upstream,
        Processes(tmp_path) as processes,
    ):
        (tmp_path / "fusillade.toml").write_text(config(tmp_path, upstream.url, idle_poll="200ms"))
        server, url = await processes.serve("--config", "fusillade.toml")
        await server.registered()
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="local") as sdk:
            batch_id = await upload_and_create(sdk, 200)
            await polling.until(lambda: upstream.stats.requests_total >= 40, within=30, message="some sent")
            [first] = children(server)
            os.kill(first, signal.SIGKILL)
            await polling.until(lambda: len(children(server)) == 2, within=30, message="a new daemon process")

            async def finished() -> bool:
                batch = await sdk.batches.retrieve(batch_id)
                return batch.status == "completed"

            await polling.until(finished, within=60, message="the batch to complete")
            batch = await sdk.batches.retrieve(batch_id)
            assert batch.output_file_id is not None
            output = (await sdk.files.content(batch.output_file_id)).text.splitlines()
        server.check_running()
        assert not alive(first) and alive(children(server)[1])
    assert "The daemon process exited with code -9; starting it again" in server.log_text()
    assert Counter(json.loads(line)["custom_id"] for line in output) == {f"r-{n}": 1 for n in range(200)}
    assert server.popen.returncode == 0


async def test_a_daemon_process_that_keeps_dying_at_start_stops_serve(tmp_path: Path) -> None:
    async with MockUpstream(Behaviour()) as upstream, Processes(tmp_path) as processes:
        (tmp_path / "fusillade.toml").write_text(config(tmp_path, upstream.url))
        server, _ = await processes.serve("--config", "fusillade.toml")
        for killed in range(3):  # each one killed as soon as it shows up: three failed starts in a row
            await polling.until(
                lambda started=killed + 1: len(children(server)) >= started, within=30, message="a daemon process"
            )
            os.kill(children(server)[killed], signal.SIGKILL)

        code = await polling.until(server.popen.poll, within=30, message="serve to give up")
    assert code == 1
    assert "The daemon process failed 3 times in a row" in server.log_text()
    assert not any(alive(pid) for pid in children(server))


async def test_serve_killed_takes_its_daemon_process_with_it(tmp_path: Path) -> None:
    async with MockUpstream(Behaviour()) as upstream, Processes(tmp_path) as processes:
        (tmp_path / "fusillade.toml").write_text(config(tmp_path, upstream.url))
        server, _ = await processes.serve("--config", "fusillade.toml")
        await server.registered()
        [child] = children(server)
        await server.kill()
        await polling.until(lambda: not alive(child), within=10, message="the daemon process to die with serve")
