"""`/v1/batches`: create (idempotent, safe to retry), retrieve, list, cancel; and fusillade's extras: the
requests of a batch, and retrying its failed requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from fusillade import errors
from fusillade.api import schemas
from fusillade.api.auth import Caller
from fusillade.api.context import context_of
from fusillade.api.errors import ApiError
from fusillade.domain import ids, models, states

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=schemas.ERROR_RESPONSES)


@router.post(
    "",
    response_model=schemas.BatchObject,
    summary="Create a batch",
    responses={413: {"model": schemas.ErrorEnvelope, "description": "The body is larger than 1 MiB."}},
)
async def create_batch(
    request: Request,
    caller: Caller,
    body: schemas.CreateBatchBody,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    retry_count: Annotated[str | None, Header(alias="x-stainless-retry-count")] = None,
) -> schemas.BatchObject:
    """Starts `in_progress` at once (the file was validated at upload). With an `Idempotency-Key`, the same
    key from the same owner returns the first batch. Without one, a request marked as a retry by
    `x-stainless-retry-count` >= 1 (the openai SDK sends it when it re-sends after a 5xx or a lost
    connection) returns the batch its first attempt created within the last 10 minutes, if any."""
    spec = models.BatchSpec(
        owner=caller.owner,
        input_file_id=ids.parse_file_id(body.input_file_id),
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
        idempotency_key=idempotency_key,
        budget=None if body.budget is None else body.budget.budget(),
    )
    service = context_of(request).service
    batch = await service.create_batch(spec, retried=_is_retry(retry_count))
    return schemas.BatchObject.of(batch, service.prices)


@router.get("/{batch_id}", response_model=schemas.BatchObject, summary="Retrieve a batch")
async def retrieve_batch(request: Request, caller: Caller, batch_id: str) -> schemas.BatchObject:
    service = context_of(request).service
    batch = await service.get_batch(ids.parse_batch_id(batch_id), owner=caller.scope)
    return schemas.BatchObject.of(batch, service.prices)


@router.get("", response_model=schemas.BatchList, summary="List batches")
async def list_batches(
    request: Request,
    caller: Caller,
    after: Annotated[str | None, Query(description="Id of the last batch of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> schemas.BatchList:
    """Newest first."""
    service = context_of(request).service
    try:
        cursor = ids.parse_batch_id(after) if after is not None else None
        page = await service.list_batches(owner=caller.scope, after=cursor, limit=limit)
    except errors.NotFound as exc:
        raise ApiError(400, f"after: {exc.message}", code="invalid_value", param="after") from exc
    data = [schemas.BatchObject.of(batch, service.prices) for batch in page.items]
    return schemas.BatchList(data=data, **schemas.ListEnvelope.cursors(data, has_more=page.has_more))


@router.post("/{batch_id}/cancel", response_model=schemas.BatchObject, summary="Cancel a batch")
async def cancel_batch(request: Request, caller: Caller, batch_id: str) -> schemas.BatchObject:
    """Pending requests are cancelled at once; requests in flight are aborted by their daemon, then the batch
    is `cancelled`. Finished results stay in the output file. A completed, failed or expired batch: 400."""
    service = context_of(request).service
    batch = await service.cancel_batch(ids.parse_batch_id(batch_id), owner=caller.scope)
    return schemas.BatchObject.of(batch, service.prices)


@router.get("/{batch_id}/requests", response_model=schemas.RequestList, summary="List a batch's requests")
async def list_requests(
    request: Request,
    caller: Caller,
    batch_id: str,
    state: Annotated[states.RequestState | None, Query()] = None,
    after: Annotated[str | None, Query(description="Id of the last request of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.RequestList:
    """fusillade extra: the requests in input line order, optionally of one state, with their attempts and
    results."""
    service = context_of(request).service
    parsed_batch = ids.parse_batch_id(batch_id)
    try:
        cursor = ids.parse_request_id(after) if after is not None else None
    except errors.NotFound as exc:
        raise ApiError(400, f"after: {exc.message}", code="invalid_value", param="after") from exc
    page = await service.list_requests(parsed_batch, owner=caller.scope, state=state, after=cursor, limit=limit)
    data = [schemas.RequestObject.of(item) for item in page.items]
    return schemas.RequestList(data=data, **schemas.ListEnvelope.cursors(data, has_more=page.has_more))


@router.post("/{batch_id}/retry", response_model=schemas.BatchObject, summary="Retry a batch's failed requests")
async def retry_failed(request: Request, caller: Caller, batch_id: str) -> schemas.BatchObject:
    """fusillade extra: failed requests go back to pending (attempts reset) and the batch runs again; returns
    the batch. A cancelling, cancelled or expired batch: 400."""
    service = context_of(request).service
    parsed = ids.parse_batch_id(batch_id)
    return schemas.BatchObject.of(await service.retry_failed(parsed, owner=caller.scope), service.prices)


def _is_retry(retry_count: str | None) -> bool:
    if retry_count is None:
        return False
    try:
        return int(retry_count) >= 1
    except ValueError:
        return False
