"""A daemon in its own process, for tests that kill it (`python -m tests.support.daemon_process ...`).

The CLI's `fusillade daemon` does the same from a configuration file; this entry takes just what a test needs
on the command line, so that crash tests do not depend on the configuration layer."""

from __future__ import annotations

import argparse
import asyncio
import logging
from datetime import timedelta

from fusillade.daemon import Daemon, DaemonSettings, run_until_signalled
from fusillade.domain.retry import RetryPolicy
from fusillade.storage import factory
from fusillade.upstream.client import UpstreamClient
from fusillade.upstream.routes import Route


async def serve(arguments: argparse.Namespace) -> None:
    storage = await factory.open_storage(arguments.database)
    routes = {}
    for item in arguments.model:
        name, _, limit = item.partition("=")
        routes[name] = Route(base_url=arguments.upstream, concurrency=int(limit))
    settings = DaemonSettings(
        heartbeat_interval=timedelta(milliseconds=arguments.heartbeat_ms),
        stale_after=timedelta(milliseconds=arguments.stale_after_ms),
        maintenance_interval=timedelta(milliseconds=100),
        idle_poll_interval=timedelta(milliseconds=100),
        shutdown_grace=timedelta(seconds=2),
        retry=RetryPolicy(base_delay=timedelta(milliseconds=20), max_delay=timedelta(milliseconds=200)),
    )
    try:
        async with UpstreamClient() as client:
            await run_until_signalled(Daemon(storage, client, routes, settings=settings))
    finally:
        await storage.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True, help="sqlite:///PATH or postgresql://...")
    parser.add_argument("--upstream", required=True, help="base URL of the upstream")
    parser.add_argument("--model", action="append", required=True, help="NAME=LIMIT (repeatable)")
    parser.add_argument("--heartbeat-ms", type=int, default=200)
    parser.add_argument("--stale-after-ms", type=int, default=1000)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(arguments))


if __name__ == "__main__":
    main()
