"""The HTTP API on a real socket for tests: uvicorn serving `create_app` on 127.0.0.1 (ephemeral port) in the
test's event loop, with a real storage, a `Service`, and keys made in the database."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import uvicorn
from prometheus_client import CollectorRegistry

from fusillade import api_keys, errors
from fusillade.api import ApiContext, create_app
from fusillade.domain import jsonl, models, served
from fusillade.domain.prices import NO_PRICES, Prices
from fusillade.service import Service
from fusillade.storage import base
from tests.support import polling

ADMIN_KEY = "fus_test-admin-key-from-the-configuration"
ROUTED_MODELS = frozenset({"model-a", "model-b"})


@dataclass
class RunningApi:
    url: str
    """`http://127.0.0.1:<port>`"""
    context: ApiContext
    notified: list[int] = field(default_factory=list)
    """One entry per `notify_work` call of the service."""

    @property
    def base_url(self) -> str:
        """What the openai SDK takes as `base_url`."""
        return self.url + "/v1"

    @property
    def storage(self) -> base.Storage:
        return self.context.storage

    @property
    def service(self) -> Service:
        return self.context.service


async def create_key(storage: base.Storage, owner: str, *, admin: bool = False) -> str:
    """A new stored API key of `owner`; returns the key itself."""
    new = api_keys.new_key()
    await storage.create_api_key(
        owner=owner, name=f"{owner} test", key_hash=new.key_hash, prefix=new.prefix, admin=admin
    )
    return new.key


def routed(*names: str, default_route: bool = False, now: datetime | None = None) -> served.ServedModels:
    """A routing table of `names` (each routed since `now`, default: now), with or without a default route."""
    return served.ServedModels.of(names, default_route=default_route, now=now or datetime.now(UTC))


def make_context(
    storage: base.Storage,
    *,
    limits: jsonl.Limits = jsonl.DEFAULT_LIMITS,
    served_models: Callable[[], served.ServedModels] | None = None,
    spool_directory: Path | None = None,
    notify_work: Callable[[], None] = lambda: None,
    admin_key: str | None = ADMIN_KEY,
    open_owner: str | None = None,
    registry: CollectorRegistry | None = None,
    metrics_key: str | None = None,
    prices: Prices = NO_PRICES,
) -> ApiContext:
    """An API context on `storage`; `served_models` (default: `ROUTED_MODELS`, no default route) is read at each
    upload and listing, so a test may change what it returns."""
    default = routed(*ROUTED_MODELS)
    service = Service(
        storage,
        limits=limits,
        served_models=served_models or (lambda: default),
        spool_directory=spool_directory,
        notify_work=notify_work,
        prices=prices,
    )
    return ApiContext(
        storage=storage,
        service=service,
        registry=registry or CollectorRegistry(),
        admin_key=admin_key,
        open_owner=open_owner,
        metrics_key=metrics_key,
    )


@contextlib.asynccontextmanager
async def serving(context: ApiContext) -> AsyncIterator[str]:
    """Serve the API of `context` until the block ends; yields its URL."""
    config = uvicorn.Config(create_app(context), log_level="warning", lifespan="off", ws="none", access_log=False)
    server = uvicorn.Server(config)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await polling.until(lambda: server.started or task.done(), within=10, message="uvicorn to start")
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        listener.close()


@contextlib.asynccontextmanager
async def running_api(
    storage: base.Storage, *, notify_work: Callable[[], None] = lambda: None, **context_options: Any
) -> AsyncIterator[RunningApi]:
    """`make_context(storage, **context_options)` served; `notify_work` calls are counted in `notified` (and
    passed on to `notify_work`, e.g. a daemon's)."""
    notified: list[int] = []

    def notify() -> None:
        notified.append(1)
        notify_work()

    context = make_context(storage, notify_work=notify, **context_options)
    async with serving(context) as url:
        yield RunningApi(url=url, context=context, notified=notified)


class FlakyStorage:
    """A storage whose database 'goes away' on demand: while `down`, every call raises `StorageUnavailable`;
    `lose_create_answers` makes that many `create_batch` calls commit and then raise it (the answer was lost,
    as when a connection breaks after the commit)."""

    def __init__(self, inner: base.Storage) -> None:
        self._inner = inner
        self.down = False
        self.lose_create_answers = 0

    def as_storage(self) -> base.Storage:
        return cast(base.Storage, self)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise errors.StorageUnavailable("The database is down (test).")
            return await target(*args, **kwargs)

        return call

    async def create_batch(self, spec: models.BatchSpec) -> models.Batch:
        if self.down:
            raise errors.StorageUnavailable("The database is down (test).")
        batch = await self._inner.create_batch(spec)
        if self.lose_create_answers > 0:
            self.lose_create_answers -= 1
            raise errors.StorageUnavailable("The answer of the commit was lost (test).")
        return batch
