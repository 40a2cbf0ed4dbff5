"""`python -m fusillade.mock_upstream`: the mock upstream as its own process, for benchmarks and demos.

The first line it prints is the URL it listens on (flushed), so a parent process can start it on port 0 and
read where it went. SIGTERM or SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Sequence

from fusillade.mock_upstream.behaviour import (
    NO_LATENCY,
    Behaviour,
    ConnectionReset,
    FixedLatency,
    HttpError,
    Latency,
    LogNormalLatency,
    UniformLatency,
)
from fusillade.mock_upstream.server import MockUpstream


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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, serve with uvloop when it is installed, and return the exit status."""
    arguments = _parser().parse_args(argv)
    try:
        behaviour = behaviour_from_arguments(arguments)
    except ValueError as error:
        _parser().error(str(error))
    loop_factory = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop_factory = uvloop.new_event_loop
    serve = run(
        behaviour,
        host=arguments.host,
        port=arguments.port,
        track_custom_ids=arguments.track_custom_ids,
        header_history=arguments.header_history,
        on_ready=lambda url: print(url, flush=True),
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve)
    return 0


def behaviour_from_arguments(arguments: argparse.Namespace) -> Behaviour:
    """The `Behaviour` the command line asks for (ValueError when it makes no sense)."""
    return Behaviour(
        latency=_latency(arguments),
        event_interval_s=arguments.event_interval_ms / 1000,
        error_rates=dict(arguments.error_rate),
        fault_rates={ConnectionReset(): arguments.reset_rate} if arguments.reset_rate else {},
        fail_first_n_attempts=arguments.fail_first_n,
        first_attempts_fault=HttpError(arguments.fail_first_status),
        retry_after_s=arguments.retry_after_s,
        retry_after_ms=arguments.retry_after_ms,
        api_key=arguments.api_key,
        seed=arguments.seed,
        embedding_dimensions=arguments.embedding_dimensions,
    )


def _latency(arguments: argparse.Namespace) -> Latency:
    if arguments.latency_ms is not None:
        return FixedLatency(arguments.latency_ms / 1000)
    if arguments.latency_uniform_ms is not None:
        low, high = arguments.latency_uniform_ms
        return UniformLatency(low / 1000, high / 1000)
    if arguments.latency_lognormal_ms is not None:
        median, p99 = arguments.latency_lognormal_ms
        return LogNormalLatency(median / 1000, p99 / 1000)
    return NO_LATENCY


def _status_rate(text: str) -> tuple[int, float]:
    status, separator, rate = text.partition("=")
    try:
        if not separator:
            raise ValueError
        return int(status), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STATUS=RATE such as 500=0.1, not {text!r}") from None


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusillade.mock_upstream",
        description="A fake OpenAI-compatible upstream. Prints its URL on the first line of stdout.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): any free port")
    latency = parser.add_mutually_exclusive_group()
    latency.add_argument("--latency-ms", type=float, metavar="MS", help="fixed time to first byte")
    latency.add_argument("--latency-uniform-ms", type=float, nargs=2, metavar=("MIN", "MAX"))
    latency.add_argument("--latency-lognormal-ms", type=float, nargs=2, metavar=("MEDIAN", "P99"))
    parser.add_argument(
        "--event-interval-ms", type=float, default=0.0, metavar="MS", help="pause between SSE events"
    )
    parser.add_argument(
        "--error-rate", type=_status_rate, action="append", default=[], metavar="STATUS=RATE", help="repeatable"
    )
    parser.add_argument("--reset-rate", type=float, default=0.0, help="share of connections reset")
    parser.add_argument("--fail-first-n", type=int, default=0, metavar="N", help="per custom id")
    parser.add_argument("--fail-first-status", type=int, default=500, metavar="STATUS")
    parser.add_argument("--retry-after-s", type=_optional_int, default=1, metavar="S|none", help="of a 429")
    parser.add_argument("--retry-after-ms", type=_optional_int, default=None, metavar="MS|none", help="of a 429")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding-dimensions", type=int, default=8)
    parser.add_argument("--header-history", type=int, default=1000, metavar="N")
    parser.add_argument(
        "--no-track-custom-ids",
        dest="track_custom_ids",
        action="store_false",
        help="keep no per-custom-id arrivals (flat memory)",
    )
    return parser
