"""`fusillade mock-upstream` (also `python -m fusillade.mock_upstream`): the mock upstream as its own process,
for demos, benchmarks and failure tests.

The first line it prints is the URL it listens on (flushed), so a parent process can start it on port 0 and
read where it went. SIGTERM or SIGINT stop it cleanly.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Annotated, Literal

import typer

from fusillade.mock_upstream.behaviour import (
    CUSTOM_ID_HEADER,
    NO_LATENCY,
    Behaviour,
    ConnectionReset,
    FixedLatency,
    HttpError,
    Latency,
    LogNormalLatency,
    UniformLatency,
)


async def run(
    behaviour: Behaviour,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    track_custom_ids: bool = True,
    header_history: int = 1000,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or until cancelled); `on_ready` gets the URL once listening."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    # Imported here: registering this command (every `fusillade` command does) must not load aiohttp's server.
    from fusillade.mock_upstream.server import MockUpstream

    try:
        upstream = MockUpstream(
            behaviour, host=host, port=port, track_custom_ids=track_custom_ids, header_history=header_history
        )
        async with upstream:
            if on_ready is not None:
                on_ready(upstream.url)
            await stop.wait()
    finally:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)


def mock_upstream(
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            "--port",
            metavar="PORT",
            min=0,
            max=65535,
            help="TCP port; 0 picks a free one. The URL is printed on the first line either way.",
        ),
    ] = 0,
    latency_ms: Annotated[
        float | None,
        typer.Option(
            "--latency-ms",
            metavar="MS",
            min=0,
            help="Wait this many milliseconds before the first byte of every response.",
            show_default=False,
        ),
    ] = None,
    latency_uniform_ms: Annotated[
        tuple[float, float] | None,
        typer.Option(
            "--latency-uniform-ms",
            metavar="MIN MAX",
            help="Wait a time drawn uniformly between MIN and MAX milliseconds instead.",
            show_default=False,
        ),
    ] = None,
    latency_lognormal_ms: Annotated[
        tuple[float, float] | None,
        typer.Option(
            "--latency-lognormal-ms",
            metavar="MEDIAN P99",
            help="Wait a long-tailed time instead, as a real model server does: half the responses start "
            "within MEDIAN milliseconds, one in a hundred takes longer than P99.",
            show_default=False,
        ),
    ] = None,
    event_interval_ms: Annotated[
        float,
        typer.Option(
            "--event-interval-ms",
            metavar="MS",
            min=0,
            help="Pause between two server-sent events of a streamed response, in milliseconds.",
        ),
    ] = 0.0,
    error_rate: Annotated[
        list[str] | None,
        typer.Option(
            "--error-rate",
            metavar="STATUS=RATE",
            help="Answer this share of the requests with this HTTP status and an OpenAI error body, such as "
            "500=0.1 for one in ten (repeatable).",
            show_default=False,
        ),
    ] = None,
    reset_rate: Annotated[
        float,
        typer.Option(
            "--reset-rate",
            metavar="RATE",
            min=0,
            max=1,
            help="Share of the requests whose connection is reset before any byte of the answer.",
        ),
    ] = 0.0,
    fail_first_n: Annotated[
        int,
        typer.Option(
            "--fail-first-n",
            metavar="N",
            min=0,
            help=f"Fail the first N attempts of every custom id (told by the {CUSTOM_ID_HEADER} header that "
            "fusillade sends), with the status of --fail-first-status; later attempts succeed.",
        ),
    ] = 0,
    fail_first_status: Annotated[
        int,
        typer.Option(
            "--fail-first-status",
            metavar="STATUS",
            min=400,
            max=599,
            help="HTTP status of those first failures (see --fail-first-n).",
        ),
    ] = 500,
    retry_after_s: Annotated[
        str,
        typer.Option(
            "--retry-after-s",
            metavar="SECONDS",
            help="Retry-After header of a 429 answer, in whole seconds; none sends no header.",
        ),
    ] = "1",
    retry_after_ms: Annotated[
        str,
        typer.Option(
            "--retry-after-ms",
            metavar="MS",
            help="retry-after-ms header of a 429 answer, in milliseconds; none sends no header.",
        ),
    ] = "none",
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            metavar="KEY",
            help="Answer 401 to every request without the header Authorization: Bearer KEY.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", metavar="N", help="Seed of the random draws (latency, errors), so that runs repeat."
        ),
    ] = 0,
    embedding_dimensions: Annotated[
        int,
        typer.Option(
            "--embedding-dimensions", metavar="N", min=1, help="Length of the vectors that /v1/embeddings returns."
        ),
    ] = 8,
    capacity: Annotated[
        int | None,
        typer.Option(
            "--capacity",
            metavar="N",
            min=1,
            help="Serve at most N requests at once (each taking the latency); above it, see --over-capacity.",
            show_default=False,
        ),
    ] = None,
    over_capacity: Annotated[
        str,
        typer.Option(
            "--over-capacity",
            metavar="MODE",
            help="Above --capacity: refuse answers 429 at once, without Retry-After (a gateway's cap); queue "
            "holds the request until a slot is free, so latency grows with load (a model server).",
        ),
    ] = "refuse",
    header_history: Annotated[
        int,
        typer.Option(
            "--header-history",
            metavar="N",
            min=0,
            help="How many of the latest requests' headers GET /stats shows.",
        ),
    ] = 1000,
    no_track_custom_ids: Annotated[
        bool,
        typer.Option(
            "--no-track-custom-ids",
            help="Count no attempts per custom id in GET /stats, so that memory stays flat in long load tests "
            "(--fail-first-n still counts what it needs).",
        ),
    ] = False,
) -> None:
    """Run a fake OpenAI-compatible upstream.

    For demos, load and failure tests. It answers POST /v1/chat/completions, /v1/completions, /v1/embeddings
    and /v1/responses, as JSON or as server-sent events when the request asks for a stream. GET /stats shows
    what it received; POST /reset clears that. It prints its URL on the first line of stdout and stops on
    SIGTERM or Ctrl-C.
    """
    try:
        behaviour = Behaviour(
            latency=_latency(latency_ms, latency_uniform_ms, latency_lognormal_ms),
            event_interval_s=event_interval_ms / 1000,
            error_rates=dict(_status_rate(text) for text in error_rate or []),
            fault_rates={ConnectionReset(): reset_rate} if reset_rate else {},
            fail_first_n_attempts=fail_first_n,
            first_attempts_fault=HttpError(fail_first_status),
            retry_after_s=_optional_int(retry_after_s, "--retry-after-s"),
            retry_after_ms=_optional_int(retry_after_ms, "--retry-after-ms"),
            api_key=api_key,
            seed=seed,
            embedding_dimensions=embedding_dimensions,
            capacity=capacity,
            over_capacity=_over_capacity(over_capacity),
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    serve(
        behaviour,
        host=host,
        port=port,
        track_custom_ids=not no_track_custom_ids,
        header_history=header_history,
    )


def serve(behaviour: Behaviour, *, host: str, port: int, track_custom_ids: bool, header_history: int) -> None:
    """Serve in this thread, on uvloop when it is installed, printing the URL once listening."""
    loop_factory = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop_factory = uvloop.new_event_loop
    main = run(
        behaviour,
        host=host,
        port=port,
        track_custom_ids=track_custom_ids,
        header_history=header_history,
        on_ready=lambda url: print(url, flush=True),
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


def main() -> None:
    """`python -m fusillade.mock_upstream`: the same command on its own."""
    typer.run(mock_upstream)


def _latency(
    fixed: float | None, uniform: tuple[float, float] | None, lognormal: tuple[float, float] | None
) -> Latency:
    given = [
        name
        for name, value in (
            ("--latency-ms", fixed),
            ("--latency-uniform-ms", uniform),
            ("--latency-lognormal-ms", lognormal),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} cannot be used together: choose one latency.")
    if fixed is not None:
        return FixedLatency(fixed / 1000)
    if uniform is not None:
        low, high = uniform
        return UniformLatency(low / 1000, high / 1000)
    if lognormal is not None:
        median, p99 = lognormal
        return LogNormalLatency(median / 1000, p99 / 1000)
    return NO_LATENCY


def _status_rate(text: str) -> tuple[int, float]:
    status, separator, rate = text.partition("=")
    try:
        if not separator:
            raise ValueError
        return int(status), float(rate)
    except ValueError:
        raise ValueError(f"--error-rate: write STATUS=RATE, such as 500=0.1, not {text!r}.") from None


def _over_capacity(text: str) -> Literal["refuse", "queue"]:
    if text == "refuse":
        return "refuse"
    if text == "queue":
        return "queue"
    raise ValueError(f"--over-capacity: write refuse or queue, not {text!r}.")


def _optional_int(text: str, option: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{option}: write a whole number or none, not {text!r}.") from None
