"""The composition root opens every database with the configuration's settings: `fusillade run`'s state
database and the short commands' database give up on a database that does not answer within the
configuration's `database_timeout`, not the default's 30 s.

The database here is a TCP server that accepts connections and never answers, as a PostgreSQL server cut off
by the network looks to its clients (nothing to install: no real PostgreSQL is needed to be silent).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import pytest

from fusillade import errors
from fusillade.cli import local_run
from fusillade.composition import database
from fusillade.config import Config, RouteSection, load_config
from fusillade.domain import models

DATABASE_TIMEOUT = "300ms"
GIVES_UP_WITHIN = 10.0
"""Seconds: well above what a 300 ms timeout takes (connecting is allowed twice that), well below the default
database_timeout (30 s) that a database opened without the configuration's would wait."""


@contextlib.asynccontextmanager
async def silent_database() -> AsyncIterator[str]:
    """The URL of a "PostgreSQL server" that accepts connections and never says a word."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes its end
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"postgresql://fusillade@127.0.0.1:{port}/silent"
    finally:
        server.close()
        await server.wait_closed()


def configuration(database_url: str) -> Config:
    """The configuration of a user who set `database_timeout` (as `FUSILLADE_DATABASE_TIMEOUT`), with a route
    for the model of the input."""
    config = load_config(
        None, environ={"FUSILLADE_DATABASE_TIMEOUT": DATABASE_TIMEOUT, "FUSILLADE_DATABASE_URL": database_url}
    )
    return config.model_copy(update={"models": {"demo": RouteSection(base_url="http://127.0.0.1:9")}})


def no_display(counts: models.RequestCounts) -> NoReturn:
    raise AssertionError("a run whose database never opened has no progress to show")


async def test_a_run_opens_its_state_database_with_the_configured_database_timeout(tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "demo"}}\n'
    )
    async with silent_database() as url:
        files = local_run.RunFiles.beside(requests, output=None, errors=None, database_url=url)
        started = time.monotonic()
        with pytest.raises(errors.StorageUnavailable):
            async with asyncio.timeout(GIVES_UP_WITHIN):
                await local_run.run_batch(
                    configuration(url),
                    files,
                    completion_window="24h",
                    retry_failed=False,
                    display=no_display,
                    note=lambda message: None,
                )
    assert time.monotonic() - started < GIVES_UP_WITHIN
    assert not files.output.exists() and not files.errors.exists()


async def test_the_short_commands_open_their_database_with_the_configured_database_timeout() -> None:
    """`keys`, `status` and `migrate` open the database through `composition.database.open_storage`."""
    async with silent_database() as url:
        started = time.monotonic()
        with pytest.raises(errors.StorageUnavailable):
            async with asyncio.timeout(GIVES_UP_WITHIN):
                await database.open_storage(configuration(url), migrate=False)
    assert time.monotonic() - started < GIVES_UP_WITHIN
