"""`GET /v1/usage` (fusillade extra): the token usage and cost of the caller's completed requests, by model, day or
batch. An admin sees every owner's, a row per owner (or one owner's, with `owner`); any other caller sees its own
only, and naming another owner is refused (403) rather than silently answered with the caller's own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Annotated, Final, TypeVar

from fastapi import APIRouter, Query, Request

from fusillade.api import schemas
from fusillade.api.auth import Caller, Principal
from fusillade.api.context import context_of
from fusillade.api.errors import ApiError
from fusillade.domain import models, usage_report

T = TypeVar("T")

_FORBIDDEN: Final = {
    "model": schemas.ErrorEnvelope,
    "description": "Another owner's usage, asked without an admin key.",
}
router = APIRouter(prefix="/v1/usage", tags=["usage"], responses={**schemas.ERROR_RESPONSES, 403: _FORBIDDEN})


@router.get("", response_model=schemas.UsageList, summary="Usage and cost by model, day or batch")
async def get_usage(
    request: Request,
    caller: Caller,
    group_by: Annotated[
        str, Query(description="`model`, `day` (UTC) or `batch`; rows are always split by owner and model too.")
    ] = "model",
    since: Annotated[
        str | None,
        Query(description="Only the UTC days from this one on: a date `YYYY-MM-DD`, or Unix seconds (their day)."),
    ] = None,
    owner: Annotated[str | None, Query(description="Admin keys: one owner's usage only.")] = None,
) -> schemas.UsageList:
    """The completed requests' token usage summed per owner and model (and per day or batch), each row priced
    with the configured `pricing` (`cost` null for a model without), and the total. Batches deleted since still
    count: usage is the owner's spending history."""
    by = _parsed(usage_report.grouping, group_by, "group_by")
    first_day = None if since is None else _parsed(_since_day, since, "since")
    report = await context_of(request).service.usage_report(owner=_scope(caller, owner), since=first_day, by=by)
    return schemas.UsageList.of(report, by=by, since=first_day)


def _since_day(text: str) -> date:
    return usage_report.since_day(text, seconds=True)


def _parsed(parse: Callable[[str], T], text: str, param: str) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        raise ApiError(400, f"{param}: {exc}", code="invalid_value", param=param) from exc


def _scope(caller: Principal, owner: str | None) -> models.OwnerScope:
    if owner is None or owner == caller.scope:
        return caller.scope
    if caller.scope is models.ALL_OWNERS:
        return owner
    raise ApiError(
        403,
        "Only an admin key reads another owner's usage; leave out `owner` to read your own.",
        code="permission_denied",
        param="owner",
    )
