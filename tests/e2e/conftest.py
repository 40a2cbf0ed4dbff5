"""Shared fixtures of the HTTP API tests (`test_api*.py`): the API on a real socket over the test's storage (each
test once per backend), an aiohttp session to call it, and the API keys of two owners, alice and bob."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from fusillade.domain import jsonl
from fusillade.storage import base
from tests.support.api_server import RunningApi, create_key, running_api

MAX_BYTES = 200_000
"""The upload limit of the `api` fixture."""


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def api(storage: base.Storage, spool: Path, registry: CollectorRegistry) -> AsyncIterator[RunningApi]:
    async with running_api(
        storage, limits=jsonl.Limits(max_bytes=MAX_BYTES), spool_directory=spool, registry=registry
    ) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def alice(api: RunningApi) -> str:
    return await create_key(api.storage, "alice")


@pytest.fixture
async def bob(api: RunningApi) -> str:
    return await create_key(api.storage, "bob")
