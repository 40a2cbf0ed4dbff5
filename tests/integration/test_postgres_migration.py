"""The claim function on PostgreSQL: defined once (`functions/claim_requests.sql`), installed by `migrate` after
the migrations, under their lock, when the database holds an older version or none, and never downgraded.

Each test has an empty database of its own. "A database made by an earlier release" is one whose migrations were
applied but whose function is not recorded in `schema_functions` (releases before the function file wrote it in
migrations 0001 and 0003): the tests put a stand-in function there, with the real signature (read from a freshly
migrated database, not copied here) and a body that only raises, so that a replacement shows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from fusillade import clock as clocks
from fusillade.storage import migrate
from fusillade.storage.postgres import migration
from fusillade.storage.postgres.connection import Database
from fusillade.storage.postgres.store import PostgresStorage
from tests.support import postgres

pytestmark = pytest.mark.postgres

FUNCTION = "claim_requests"
LOCK_WAIT_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.02
MIGRATION_TIMEOUT_S = 30.0

_DEFINITION = "SELECT pg_get_functiondef(to_regproc($1))"
_SIGNATURE = "SELECT pg_get_function_identity_arguments(to_regproc($1)), pg_get_function_result(to_regproc($1))"
_RECORDED = "SELECT version FROM schema_functions WHERE name = $1"
_OVERLOADS = "SELECT count(*) FROM pg_proc WHERE proname = $1"
_WAITING_FOR_MIGRATION_LOCK = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = $1)
"""


def file_version() -> int:
    functions = migrate.load_functions(migration.FUNCTIONS_PACKAGE)
    (function,) = [found for found in functions if found.name == FUNCTION]
    return function.version


@pytest.fixture
async def empty_url(postgres_server: postgres.Server) -> AsyncIterator[str]:
    """URL of a new, empty database of this test alone (no migration applied)."""
    url = await postgres.create_database(postgres_server.url)
    try:
        yield url
    finally:
        await postgres.drop_database(postgres_server.url, url)


@pytest.fixture
async def fresh_definition(postgres_server: postgres.Server) -> AsyncIterator[tuple[str, str, str]]:
    """The claim function of a freshly migrated database: (definition, identity arguments, result type)."""
    url = await postgres.create_database(postgres_server.url)
    try:
        await migrate_with_the_store(url)
        connection = await asyncpg.connect(url)
        try:
            definition = await connection.fetchval(_DEFINITION, FUNCTION)
            signature = await connection.fetchrow(_SIGNATURE, FUNCTION)
            assert signature is not None
            arguments, result = signature
        finally:
            await connection.close()
    finally:
        await postgres.drop_database(postgres_server.url, url)
    yield definition, arguments, result


async def migrate_with_the_store(url: str) -> list[str]:
    store = await PostgresStorage.connect(url)
    try:
        return await store.migrate()
    finally:
        await store.close()


async def migrations_only(url: str) -> None:
    """Apply the migrations without installing any function."""
    database = await Database.open(url, min_size=1, max_size=1, command_timeout_s=MIGRATION_TIMEOUT_S)
    try:
        async with database.connection() as connection:
            target = migration.MigrationTarget(connection, clocks.SystemClock(), timeout_s=MIGRATION_TIMEOUT_S)
            await migrate.run_migrations(target, migrate.load_migrations(migration.MIGRATIONS_PACKAGE))
    finally:
        await database.close()


async def put_stand_in(connection: asyncpg.Connection, arguments: str, result: str) -> str:
    """Replace the claim function with one of the same signature that only raises; returns its definition."""
    await connection.execute(
        f"CREATE OR REPLACE FUNCTION {FUNCTION}({arguments}) RETURNS {result} LANGUAGE plpgsql "
        "AS $$ BEGIN RAISE EXCEPTION 'stand-in'; END $$"
    )
    definition: str = await connection.fetchval(_DEFINITION, FUNCTION)
    return definition


async def test_a_fresh_database_gets_the_function_of_the_file_and_its_version(empty_url: str) -> None:
    applied = await migrate_with_the_store(empty_url)

    assert applied == [found.name for found in migrate.load_migrations(migration.MIGRATIONS_PACKAGE)]
    connection = await asyncpg.connect(empty_url)
    try:
        assert await connection.fetchval(_RECORDED, FUNCTION) == file_version()
        assert await connection.fetchval(_OVERLOADS, FUNCTION) == 1
        definition = await connection.fetchval(_DEFINITION, FUNCTION)
    finally:
        await connection.close()
    assert "FOR UPDATE OF r SKIP LOCKED" in definition
    assert await migrate_with_the_store(empty_url) == []


async def test_a_database_migrated_by_an_earlier_release_ends_with_the_same_function_as_a_fresh_one(
    empty_url: str, fresh_definition: tuple[str, str, str]
) -> None:
    definition, arguments, result = fresh_definition
    await migrations_only(empty_url)
    connection = await asyncpg.connect(empty_url)
    try:
        stand_in = await put_stand_in(connection, arguments, result)
        assert stand_in != definition

        assert await migrate_with_the_store(empty_url) == []  # every migration was applied already

        assert await connection.fetchval(_DEFINITION, FUNCTION) == definition
        assert await connection.fetchval(_RECORDED, FUNCTION) == file_version()
        assert await connection.fetchval(_OVERLOADS, FUNCTION) == 1
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("recorded_offset", "replaced"),
    [(-1, True), (0, False), (1, False)],
    ids=["older-is-replaced", "same-is-kept", "newer-is-kept"],
)
async def test_migrate_replaces_only_an_older_function(
    empty_url: str, fresh_definition: tuple[str, str, str], recorded_offset: int, replaced: bool
) -> None:
    """A newer release may have installed a newer function: an older release migrating (at its restart, say) in
    a rolling upgrade must leave it in place."""
    definition, arguments, result = fresh_definition
    await migrate_with_the_store(empty_url)
    connection = await asyncpg.connect(empty_url)
    try:
        stand_in = await put_stand_in(connection, arguments, result)
        recorded = file_version() + recorded_offset
        await connection.execute("UPDATE schema_functions SET version = $2 WHERE name = $1", FUNCTION, recorded)

        await migrate_with_the_store(empty_url)

        found = await connection.fetchval(_DEFINITION, FUNCTION)
        assert found == (definition if replaced else stand_in)
        assert await connection.fetchval(_RECORDED, FUNCTION) == (file_version() if replaced else recorded)
    finally:
        await connection.close()


async def test_a_recorded_function_dropped_since_is_installed_again(
    empty_url: str, fresh_definition: tuple[str, str, str]
) -> None:
    definition, arguments, _ = fresh_definition
    await migrate_with_the_store(empty_url)
    connection = await asyncpg.connect(empty_url)
    try:
        await connection.execute(f"DROP FUNCTION {FUNCTION}({arguments})")

        await migrate_with_the_store(empty_url)

        assert await connection.fetchval(_DEFINITION, FUNCTION) == definition
    finally:
        await connection.close()


async def test_the_function_is_installed_under_the_migration_lock(
    empty_url: str, fresh_definition: tuple[str, str, str]
) -> None:
    """While another process holds the migration lock, `migrate` waits, and the function stays as it was."""
    definition, arguments, result = fresh_definition
    await migrations_only(empty_url)
    database = empty_url.rsplit("/", 1)[1]
    holder = await asyncpg.connect(empty_url)
    migrating: asyncio.Task[list[str]] | None = None
    try:
        stand_in = await put_stand_in(holder, arguments, result)
        await holder.execute("SELECT pg_advisory_lock($1)", migration.MIGRATION_LOCK_KEY)
        migrating = asyncio.create_task(migrate_with_the_store(empty_url))
        async with asyncio.timeout(LOCK_WAIT_TIMEOUT_S):
            while not await holder.fetchval(_WAITING_FOR_MIGRATION_LOCK, database):
                assert not migrating.done(), migrating
                await asyncio.sleep(POLL_INTERVAL_S)

        assert await holder.fetchval(_DEFINITION, FUNCTION) == stand_in

        await holder.execute("SELECT pg_advisory_unlock($1)", migration.MIGRATION_LOCK_KEY)
        async with asyncio.timeout(LOCK_WAIT_TIMEOUT_S):
            assert await migrating == []
        assert await holder.fetchval(_DEFINITION, FUNCTION) == definition
    finally:
        await holder.close()  # releases the lock if the test failed while holding it
        if migrating is not None and not migrating.done():
            migrating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await migrating
