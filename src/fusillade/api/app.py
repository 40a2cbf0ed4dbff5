"""`create_app`: the FastAPI application of fusillade's HTTP API, on the parts an `ApiContext` holds."""

from __future__ import annotations

from fastapi import FastAPI

from fusillade import __version__
from fusillade.api.context import ApiContext
from fusillade.api.errors import install_error_handlers
from fusillade.api.routes import batches, files, health, models

DESCRIPTION = """\
OpenAI-compatible Batch API (`/v1/files`, `/v1/batches`, `/v1/models`) on your own upstreams: point the official
`openai` SDK's `base_url` here. Extras: `GET /v1/batches/{id}/requests`, `POST /v1/batches/{id}/retry`,
`/healthz`, `/readyz`, `/metrics`. Authenticate with `Authorization: Bearer <key>` (keys from
`fusillade keys create`)."""


def create_app(context: ApiContext) -> FastAPI:
    """The application; `context` is reachable from every request as `request.app.state.context`."""
    app = FastAPI(title="fusillade", version=__version__, description=DESCRIPTION, redoc_url=None)
    app.state.context = context
    install_error_handlers(app)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app
