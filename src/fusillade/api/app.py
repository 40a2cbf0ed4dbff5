"""`create_app`: the FastAPI application of fusillade's HTTP API, on the parts an `ApiContext` holds;
`create_metrics_app`: the application of a listener that serves metrics alone."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fusillade import __version__
from fusillade.api.context import ApiContext, MoreMetrics, exposition
from fusillade.api.errors import install_error_handlers
from fusillade.api.routes import batches, files, health, models, usage

DESCRIPTION = """\
OpenAI-compatible Batch API (`/v1/files`, `/v1/batches`, `/v1/models`) on your own upstreams: point the official
`openai` SDK's `base_url` here. Extras: `GET /v1/batches/{id}/requests`, `POST /v1/batches/{id}/retry`,
`GET /v1/usage`, `/healthz`, `/readyz`, `/metrics`. Authenticate with `Authorization: Bearer <key>` (keys from
`fusillade keys create`)."""


def create_app(context: ApiContext) -> FastAPI:
    """The application; `context` is reachable from every request as `request.app.state.context`."""
    app = FastAPI(title="fusillade", version=__version__, description=DESCRIPTION, redoc_url=None)
    app.state.context = context
    install_error_handlers(app)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    app.include_router(health.router)
    return app


def create_metrics_app(registry: CollectorRegistry, more: MoreMetrics | None = None) -> Starlette:
    """`GET /metrics` of `registry` (then `more`'s), without a key, and nothing else: for a listener apart from
    the API (`[server] metrics_address`, `fusillade daemon --metrics-port`), on an address only Prometheus
    reaches."""

    async def metrics(request: Request) -> Response:
        return Response(await exposition(registry, more), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
