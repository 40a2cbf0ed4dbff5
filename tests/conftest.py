"""Shared fixtures: a clean environment for every test, and PostgreSQL for the tests that need it.

PostgreSQL (see `tests/support/postgres.py`): one server per session, found or started; one migrated template
database per session; each test that asks gets its own copy (`CREATE DATABASE … TEMPLATE …`), dropped after.
When no server can be had, the PostgreSQL tests fail with the reason; they never skip.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fusillade import clock as clocks
from fusillade.mock_upstream import Behaviour, MockUpstream
from fusillade.storage import base
from fusillade.upstream.client import UpstreamClient
from tests.support import backends, postgres

ENV_PREFIX = "FUSILLADE_"
POSTGRES_URL_VARIABLE = "FUSILLADE_TEST_POSTGRES_URL"
# Read once at import, before any test scrubs the environment.
POSTGRES_URL_FROM_ENV = os.environ.get(POSTGRES_URL_VARIABLE) or None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the reliability scenarios at their bigger size (more requests, more kills)",
    )


LONG_FIRST = ("tests/reliability/", "tests/packaging/")
"""Folders whose tests run real processes, builds and outages (seconds to a minute each): they start first."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the long tests at the front (a stable sort: the order within each group stays). The workers of
    `pytest -n 2` take tests in this order, so the long ones run while the many short ones fill the gaps, and
    the two workers end together instead of one waiting for a minute-long test picked up last."""
    root = config.rootpath

    def short(item: pytest.Item) -> bool:
        path = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        return not path.startswith(LONG_FIRST)

    items.sort(key=short)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """A directory for spooled uploads (the service's `spool_directory`)."""
    directory = tmp_path / "spool"
    directory.mkdir()
    return directory


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FUSILLADE_* variable of the developer's shell or CI may change what a test sees (the test server URL
    stays: it only tells the fixtures where PostgreSQL is)."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) and name != POSTGRES_URL_VARIABLE:
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.Server]:
    """A PostgreSQL server for the whole session (a throwaway cluster is stopped and deleted at the end)."""
    try:
        server = postgres.provision(POSTGRES_URL_FROM_ENV)
    except postgres.ProvisioningError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: postgres.Server) -> Iterator[str]:
    """Name of a database migrated once per session, copied by each test."""
    name = postgres.run_sync(postgres.create_template(postgres_server.url))
    try:
        yield name
    finally:
        postgres.run_sync(
            postgres.drop_database(postgres_server.url, postgres.with_database(postgres_server.url, name))
        )


@pytest.fixture
async def postgres_url(postgres_server: postgres.Server, postgres_template: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database of this test alone."""
    url = await postgres.create_database(postgres_server.url, template=postgres_template)
    try:
        yield url
    finally:
        await postgres.drop_database(postgres_server.url, url)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[backends.Backend]:
    """The backend under test, on a fresh database (closed and dropped after the test)."""
    if request.param == "postgres":
        handle = backends.Backend(
            "postgres",
            tmp_path,
            server=request.getfixturevalue("postgres_server"),
            template=request.getfixturevalue("postgres_template"),
        )
    else:
        handle = backends.Backend("sqlite", tmp_path)
    await handle.setup()
    try:
        yield handle
    finally:
        await handle.aclose()


@pytest.fixture
async def storage(backend: backends.Backend) -> base.Storage:
    """A migrated store on the test's database, on the real clock (the contract suite overrides it with a
    store on a `ManualClock`)."""
    store: base.Storage = await backend.open_store(clocks.SystemClock())
    if not backend.is_postgres:
        await store.migrate()
    return store


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    """The fake OpenAI-compatible upstream on a real socket, answering normally until a test changes it."""
    async with MockUpstream(Behaviour()) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as upstream_client:
        yield upstream_client
