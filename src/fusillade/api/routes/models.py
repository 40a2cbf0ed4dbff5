"""`/v1/models`: the models this server serves to the caller, in OpenAI's shape (the SDK's `models.list()` and
`models.retrieve(id)`). Model ids may hold slashes (`meta-llama/Llama-3.1-8B-Instruct`): the SDK sends them
percent-encoded (`%2F`), older clients as they are, and both reach the same route."""

from __future__ import annotations

from fastapi import APIRouter, Request

from fusillade.api import schemas
from fusillade.api.auth import Caller
from fusillade.api.context import context_of

router = APIRouter(prefix="/v1/models", tags=["models"], responses=schemas.ERROR_RESPONSES)


@router.get("", response_model=schemas.ModelList, summary="List models")
async def list_models(request: Request, caller: Caller) -> schemas.ModelList:
    """Every model with a route of its own, and, with a default route, the models it serves that the caller's
    uploads named (an admin sees every owner's)."""
    found = await context_of(request).service.list_models(owner=caller.scope)
    return schemas.ModelList(data=[schemas.ModelObject.of(model) for model in found])


@router.get("/{model:path}", response_model=schemas.ModelObject, summary="Retrieve a model")
async def retrieve_model(request: Request, caller: Caller, model: str) -> schemas.ModelObject:
    """One model as the listing shows it; 404 when the caller is not served it."""
    found = await context_of(request).service.get_model(model, owner=caller.scope)
    return schemas.ModelObject.of(found)
