"""What the HTTP API needs from the process that serves it, built by the composition root
(`fusillade.composition.serving`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from fastapi import Request
from prometheus_client import CollectorRegistry, generate_latest

from fusillade.service import Service
from fusillade.storage.base import Storage


@dataclass(frozen=True, slots=True)
class ApiContext:
    storage: Storage
    """Used directly only for key lookups and the readiness probe; every use case goes through `service`."""
    service: Service
    registry: CollectorRegistry
    """Served at `/metrics`: this process's metrics."""
    admin_key: str | None = None
    """An admin key from the configuration (compared in constant time): sees every owner's objects and creates
    its own as owner `admin`. None: only keys stored in the database."""
    open_owner: str | None = None
    """Open mode: every request acts as this owner, whatever key it sends (the server runs without keys, on
    loopback only). None: a valid bearer key is required."""
    metrics_key: str | None = None
    """A key from the configuration that may read `/metrics` and nothing else (compared in constant time)."""
    more_metrics: MoreMetrics | None = None
    """Metrics of another process that `/metrics` shows after this one's (the daemon process of `serve`)."""


MoreMetrics = Callable[[], Awaitable[bytes]]
"""Prometheus text of another process (empty while it does not answer)."""


async def exposition(registry: CollectorRegistry, more: MoreMetrics | None) -> bytes:
    """The text `/metrics` answers: `registry`'s metrics, then `more`'s."""
    own = generate_latest(registry)
    return own + await more() if more is not None else own


def context_of(request: Request) -> ApiContext:
    """The context `create_app` attached to the application."""
    return cast(ApiContext, request.app.state.context)
