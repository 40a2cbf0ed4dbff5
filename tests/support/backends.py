"""Open storage backends on fresh databases for tests: one `Backend` per test, named `sqlite` or `postgres`.

A backend owns the databases it made and the stores it opened, and `aclose` closes and drops them. Tests that
need real concurrency open several stores (separate pools, separate SQLite connections) on one database.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

from fusillade import clock as clocks
from fusillade.storage import base
from tests.support import postgres

NAMES = ("sqlite", "postgres")


class Backend:
    """A fresh database of one backend kind (`location`: a file path or a database URL)."""

    def __init__(
        self,
        name: str,
        tmp_path: Path,
        *,
        server: postgres.Server | None = None,
        template: str | None = None,
    ) -> None:
        if name not in NAMES:
            raise ValueError(f"Unknown backend {name!r}.")
        if name == "postgres" and (server is None or template is None):
            raise ValueError("The postgres backend needs a server and a migrated template database.")
        self.name = name
        self._tmp_path = tmp_path
        self._server = server
        self._template = template
        self._stores: list[base.Storage] = []
        self._databases: list[str] = []
        self._counter = itertools.count(1)
        self.location = ""

    @property
    def is_postgres(self) -> bool:
        return self.name == "postgres"

    async def setup(self) -> None:
        """Create the test's database (PostgreSQL: a copy of the migrated template; SQLite: a file path that
        the first store migrates)."""
        if self._server is not None:
            self.location = await postgres.create_database(self._server.url, template=self._template)
            self._databases.append(self.location)
        else:
            self.location = str(self._tmp_path / "fusillade.db")

    async def blank_location(self) -> str:
        """Another database, empty (no migrations applied)."""
        if self._server is not None:
            url = await postgres.create_database(self._server.url)
            self._databases.append(url)
            return url
        return str(self._tmp_path / f"blank-{next(self._counter)}.db")

    async def open_store(
        self, clock: clocks.Clock, *, location: str | None = None, track: bool = True
    ) -> base.Storage:
        """A new store instance on `location` (default: the test's database). Tracked stores are closed by
        `aclose`; pass `track=False` for a store the test closes itself."""
        target = location or self.location
        store: base.Storage
        if self._server is not None:
            from fusillade.storage.postgres.store import PostgresStorage

            store = await PostgresStorage.connect(target, clock=clock)
        else:
            from fusillade.storage.sqlite.store import SqliteStorage

            store = await SqliteStorage.open(Path(target), clock=clock)
        if track:
            self._stores.append(store)
        return store

    async def aclose(self) -> None:
        """Close every tracked store, then drop the PostgreSQL databases made for the test."""
        failures: list[BaseException] = []
        for store in reversed(self._stores):
            try:
                await store.close()
            except Exception as exc:
                failures.append(exc)
        self._stores.clear()
        if self._server is not None:
            for url in self._databases:
                with contextlib.suppress(Exception):
                    await postgres.drop_database(self._server.url, url)
        if failures:
            raise failures[0]
