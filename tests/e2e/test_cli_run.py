"""`fusillade run` as a user runs it: a subprocess on a JSONL file, against the fake upstream (in this process,
so that the test can read what it saw), then the files it wrote. Also `fusillade status` on the state it left."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from fusillade.mock_upstream import Behaviour, FixedLatency, HttpError, MockUpstream
from tests.support import polling


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def fusillade(*arguments: str, cwd: Path) -> Finished:
    """Run the CLI to its end without blocking this event loop (the fake upstream lives in it)."""
    process = await start(*arguments, cwd=cwd)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=50)
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


async def start(*arguments: str, cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fusillade",
        *arguments,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def write_requests(path: Path, count: int, *, model: str = "demo") -> list[str]:
    """An OpenAI batch input of `count` chat completions; returns the custom ids."""
    custom_ids = [f"request-{index}" for index in range(count)]
    with path.open("w") as file:
        for custom_id in custom_ids:
            body = {"model": model, "messages": [{"role": "user", "content": f"Say {custom_id}"}]}
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            file.write(json.dumps(line) + "\n")
    return custom_ids


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_run_writes_the_output_file_and_exits_0(tmp_path: Path, upstream: MockUpstream) -> None:
    custom_ids = write_requests(tmp_path / "requests.jsonl", 25)

    result = await fusillade(
        "run", "requests.jsonl", "--model-route", f"demo={upstream.url},concurrency=4", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert "25 requests: 25 completed, 0 failed" in result.stdout
    output = read_lines(tmp_path / "requests.output.jsonl")
    assert sorted(line["custom_id"] for line in output) == sorted(custom_ids)
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert "errors: none (no request failed)" in result.stdout
    assert not (tmp_path / "requests.errors.jsonl").exists()  # no empty file, as the API lists none
    assert upstream.stats.requests_total == 25
    assert upstream.stats.max_in_flight <= 4

    status = await fusillade("status", "--json", "--database-url", "sqlite:///requests.fusillade.db", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    snapshot = json.loads(status.stdout)
    [batch] = snapshot["batches"]
    assert batch["status"] == "completed"
    assert batch["request_counts"]["completed"] == 25
    assert [daemon["status"] for daemon in snapshot["daemons"]] == ["dead"]  # stopped in order

    table = await fusillade("status", "--database-url", "sqlite:///requests.fusillade.db", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert batch["id"] in table.stdout
    assert "25/25 (100%)" in table.stdout


async def test_run_with_failed_requests_writes_both_files_and_exits_1(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    custom_ids = write_requests(tmp_path / "in.jsonl", 12)
    upstream.behaviour = Behaviour(
        faults_by_custom_id={"request-3": [HttpError(400)], "request-7": [HttpError(422)]}
    )

    result = await fusillade(
        "run",
        "in.jsonl",
        "-m",
        f"demo={upstream.url}",
        "--output",
        "out.jsonl",
        "--errors",
        "err.jsonl",
        cwd=tmp_path,
    )

    assert result.returncode == 1, result.stderr
    assert "12 requests: 10 completed, 2 failed" in result.stdout
    assert "--retry-failed" in result.stderr
    output, failed = read_lines(tmp_path / "out.jsonl"), read_lines(tmp_path / "err.jsonl")
    assert sorted(line["custom_id"] for line in failed) == ["request-3", "request-7"]
    assert sorted(line["custom_id"] for line in output + failed) == sorted(custom_ids)
    assert {line["response"]["status_code"] for line in failed} == {400, 422}

    upstream.behaviour = Behaviour()  # the cause is fixed: the failed requests go again, and only they
    again = await fusillade(
        "run", "in.jsonl", "-m", f"demo={upstream.url}", "-o", "out.jsonl", "-e", "err.jsonl", "--retry-failed",
        cwd=tmp_path,
    )  # fmt: skip

    assert again.returncode == 0, again.stderr
    assert sorted(line["custom_id"] for line in read_lines(tmp_path / "out.jsonl")) == sorted(custom_ids)
    assert not (tmp_path / "err.jsonl").exists()  # the earlier run's errors are gone, not left stale
    assert upstream.stats.requests_total == 14


async def test_run_rejects_a_bad_file_with_line_numbers_and_exits_2(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    lines = [
        '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "demo"}}',
        '{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "demo"}',
        '{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "other"}}',
        '{"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"model": "demo"}}',
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")

    result = await fusillade("run", "bad.jsonl", "-m", f"demo={upstream.url}", cwd=tmp_path)

    assert result.returncode == 2
    assert "bad.jsonl:2: The line is not valid JSON" in result.stderr
    assert "bad.jsonl:4: url '/v1/embeddings' differs from the first line's" in result.stderr
    assert "model 'other' (1 lines: 3) has no route: add --model-route other=http://HOST:PORT" in result.stderr
    assert "  Served models: demo.\n" in result.stderr
    assert not (tmp_path / "bad.output.jsonl").exists()
    assert upstream.stats.requests_total == 0


async def test_run_explains_a_bad_model_route_and_exits_2(tmp_path: Path) -> None:
    write_requests(tmp_path / "requests.jsonl", 1)

    result = await fusillade("run", "requests.jsonl", "-m", "demo=localhost:8000,concurrency=0", cwd=tmp_path)

    assert result.returncode == 2
    assert "--model-route demo=localhost:8000,concurrency=0" in result.stderr
    assert "is not an http(s) URL" in result.stderr


async def test_run_killed_midway_resumes_without_starting_over(tmp_path: Path, upstream: MockUpstream) -> None:
    concurrency = 6
    custom_ids = write_requests(tmp_path / "requests.jsonl", 90)
    upstream.behaviour = Behaviour(latency=FixedLatency(0.05))
    route = f"demo={upstream.url},concurrency={concurrency}"

    first = await start("run", "requests.jsonl", "-m", route, cwd=tmp_path)
    await polling.until(lambda: upstream.stats.requests_total >= 30, message="a third of the requests sent")
    first.send_signal(signal.SIGKILL)
    await first.wait()
    sent_before = upstream.stats.requests_total
    assert sent_before < len(custom_ids)

    second = await fusillade("run", "requests.jsonl", "-m", route, cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    assert "Resuming:" in second.stderr
    output = read_lines(tmp_path / "requests.output.jsonl")
    assert sorted(line["custom_id"] for line in output) == sorted(custom_ids)  # each custom_id once
    sent_twice = [
        custom_id for custom_id, attempts in upstream.stats.attempts_by_custom_id.items() if len(attempts) > 1
    ]
    assert len(sent_twice) <= concurrency  # at most those in flight at the kill
    assert upstream.stats.requests_total <= len(custom_ids) + concurrency


async def test_run_interrupted_exits_130_and_the_next_run_sends_nothing_twice(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    custom_ids = write_requests(tmp_path / "requests.jsonl", 60)
    upstream.behaviour = Behaviour(latency=FixedLatency(0.05))
    route = f"demo={upstream.url},concurrency=4"

    first = await start("run", "requests.jsonl", "-m", route, cwd=tmp_path)
    await polling.until(lambda: upstream.stats.requests_total >= 12, message="some requests sent")
    first.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(first.communicate(), timeout=30)

    assert first.returncode == 130, stderr.decode()
    assert "Run the same command again to continue" in stderr.decode()
    assert not (tmp_path / "requests.output.jsonl").exists()

    second = await fusillade("run", "requests.jsonl", "-m", route, cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    assert sorted(line["custom_id"] for line in read_lines(tmp_path / "requests.output.jsonl")) == sorted(
        custom_ids
    )
    assert upstream.stats.requests_total == len(custom_ids)  # calls in flight finished before the stop


async def test_a_finished_run_run_again_only_rewrites_the_files(tmp_path: Path, upstream: MockUpstream) -> None:
    write_requests(tmp_path / "requests.jsonl", 5)
    route = f"demo={upstream.url}"
    assert (await fusillade("run", "requests.jsonl", "-m", route, cwd=tmp_path)).returncode == 0
    (tmp_path / "requests.output.jsonl").unlink()

    again = await fusillade("run", "requests.jsonl", "-m", route, cwd=tmp_path)

    assert again.returncode == 0, again.stderr
    assert "Already run" in again.stderr
    assert len(read_lines(tmp_path / "requests.output.jsonl")) == 5
    assert upstream.stats.requests_total == 5


PROGRESS_LINE = re.compile(
    r"^requests\.jsonl: (?P<done>[\d,]+)/(?P<total>[\d,]+) \(\d+%\), (?P<failed>[\d,]+) failed, [\d,]+ in flight, "
    r"[\d,]+ retried, (?:[\d,.]+|-)/s, (?:\d+:\d\d:\d\d|-:--:--) left$"
)


async def test_a_run_writing_to_a_pipe_prints_progress_lines_while_it_goes(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    write_requests(tmp_path / "requests.jsonl", 60)
    upstream.behaviour = Behaviour(latency=FixedLatency(0.05))
    process = await start(
        "run", "requests.jsonl", "-m", f"demo={upstream.url},concurrency=2", "--progress-interval", "0.2",
        cwd=tmp_path,
    )  # fmt: skip
    assert process.stderr is not None

    async def a_line_midway() -> re.Match[str]:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            found = PROGRESS_LINE.match(line.decode().rstrip("\n"))
            if found and 0 < int(found["done"].replace(",", "")) < 60:
                return found
        raise AssertionError("the run ended without a progress line midway")

    midway = await asyncio.wait_for(a_line_midway(), timeout=30)
    assert process.returncode is None  # printed while the run was going, not at the end
    assert midway["total"] == "60"
    rest, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    assert "60 requests: 60 completed" in rest.decode()


async def test_quiet_prints_no_progress_but_the_summary(tmp_path: Path, upstream: MockUpstream) -> None:
    write_requests(tmp_path / "requests.jsonl", 5)

    result = await fusillade("run", "requests.jsonl", "-m", f"demo={upstream.url}", "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "5 requests: 5 completed, 0 failed" in result.stdout
    assert not any(PROGRESS_LINE.match(line) for line in result.stderr.splitlines()), result.stderr


def priced_config(path: Path, upstream: MockUpstream, *, model: str = "demo") -> Path:
    """A configuration routing `model` to the upstream, at 1 cent an input token (half of it cached) and 3 cents
    an output token: every cost is whole cents, shown exactly."""
    path.write_text(
        f'[models."{model}"]\nbase_url = "{upstream.url}"\nconcurrency = 4\n\n'
        f'[models."{model}".pricing]\ninput = 10000\ncached_input = 5000\noutput = 30000\n'
    )
    return path


def reported_usage(output: list[dict[str, Any]]) -> tuple[int, int]:
    """The input and output tokens the upstream reported in these output lines."""
    usages = [line["response"]["body"]["usage"] for line in output]
    return sum(usage["prompt_tokens"] for usage in usages), sum(usage["completion_tokens"] for usage in usages)


async def test_the_summary_shows_the_tokens_and_the_cost_of_a_priced_run(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    write_requests(tmp_path / "requests.jsonl", 25)
    config = priced_config(tmp_path / "fusillade.toml", upstream)

    result = await fusillade("run", "requests.jsonl", "--config", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    input_tokens, output_tokens = reported_usage(read_lines(tmp_path / "requests.output.jsonl"))
    cost = Decimal("0.01") * input_tokens + Decimal("0.03") * output_tokens
    assert cost >= 1  # shown to the cent, exactly
    lines = result.stdout.splitlines()
    assert lines[0].startswith("25 requests: 25 completed, 0 failed")
    assert lines[1] == (
        f"  tokens: {input_tokens:,} in (0 cached), {output_tokens:,} out (0 reasoning); cost ${cost:,.2f}"
    )
    assert lines[2].startswith("  output: "), result.stdout


async def test_the_summary_shows_tokens_without_a_cost_when_nothing_is_priced(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    write_requests(tmp_path / "requests.jsonl", 6)
    upstream.behaviour = Behaviour(faults_by_custom_id={"request-2": [HttpError(400)]})

    result = await fusillade("run", "requests.jsonl", "-m", f"demo={upstream.url}", cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    input_tokens, output_tokens = reported_usage(read_lines(tmp_path / "requests.output.jsonl"))
    assert f"\n  tokens: {input_tokens:,} in (0 cached), {output_tokens:,} out (0 reasoning)\n" in result.stdout
    assert "cost" not in result.stdout
