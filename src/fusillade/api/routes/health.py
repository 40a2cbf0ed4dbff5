"""Probes and metrics, outside `/v1`: `GET /healthz` (the process answers) and `GET /readyz` (the database
answers too), without authentication; `GET /metrics` (Prometheus text format), with an admin or the metrics key
when the API has keys (`auth.authorize_metrics`)."""

from __future__ import annotations

import asyncio
from typing import Final

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from fusillade import errors
from fusillade.api.auth import authorize_metrics
from fusillade.api.context import context_of, exposition
from fusillade.api.errors import RETRY_AFTER_SECONDS
from fusillade.api.schemas import ErrorEnvelope

router = APIRouter(tags=["health"])

PING_TIMEOUT_SECONDS: Final = 5.0


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the database answers")
async def readyz(request: Request) -> JSONResponse:
    try:
        async with asyncio.timeout(PING_TIMEOUT_SECONDS):
            await context_of(request).storage.ping()
    except (errors.StorageError, TimeoutError):
        return JSONResponse(
            {"status": "unavailable", "reason": "The database does not answer."},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    summary="Prometheus metrics (an admin or the metrics key when the API has keys)",
    response_class=Response,
    dependencies=[Depends(authorize_metrics)],
    responses={
        401: {"model": ErrorEnvelope, "description": "The API has keys and none was given, or an unknown one."},
        403: {"model": ErrorEnvelope, "description": "A key that may not read metrics (a tenant's)."},
    },
)
async def metrics(request: Request) -> Response:
    context = context_of(request)
    return Response(await exposition(context.registry, context.more_metrics), media_type=CONTENT_TYPE_LATEST)
