"""Who is calling: `Authorization: Bearer <key>` mapped to an owner, on every request.

| mode / key                                  | acts as (creates objects as) | sees                 |
|---------------------------------------------|------------------------------|----------------------|
| open mode (`ApiContext.open_owner` set)     | that owner, whatever the key | that owner's objects |
| the configured admin key                    | owner `admin`                | every owner's        |
| a stored key with `admin`                   | the key's owner              | every owner's        |
| a stored key                                | the key's owner              | that owner's objects |
| no key, or a key that is unknown or revoked | 401                          |                      |

`GET /metrics` shows figures of the whole fleet, so with keys it takes an admin key (the configured one, or a
stored key with `admin`) or the configured metrics key, which opens nothing else; another owner's key gets 403
(`authorize_metrics`). In open mode it is open, like everything else.

Stored keys are looked up by their SHA-256 (`fusillade.api_keys.hash_key`) on every request, so a revoked key stops
working at once. Keys are never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Request

from fusillade import api_keys
from fusillade.api.context import context_of
from fusillade.api.errors import ApiError
from fusillade.domain import models

ADMIN_OWNER: Final = "admin"
"""Owner of the objects created with the configured admin key."""
_BEARER: Final = "bearer "


@dataclass(frozen=True, slots=True)
class Principal:
    owner: str
    """Objects this caller creates belong to this owner."""
    scope: models.OwnerScope
    """Whose objects this caller may read and act on."""


async def authenticate(request: Request) -> Principal:
    """The caller of `request` (a FastAPI dependency); `ApiError` 401 when no valid key is given."""
    context = context_of(request)
    if context.open_owner is not None:
        return Principal(owner=context.open_owner, scope=context.open_owner)
    key = _bearer_key(request.headers.get("authorization"))
    if context.admin_key is not None and hmac.compare_digest(key.encode(), context.admin_key.encode()):
        return Principal(owner=ADMIN_OWNER, scope=models.ALL_OWNERS)
    found = await context.storage.find_api_key(api_keys.hash_key(key))
    if found is None:
        raise ApiError(
            401,
            "Incorrect API key provided: it is unknown or was revoked. Create one with "
            "`fusillade keys create --owner NAME`.",
            code="invalid_api_key",
        )
    return Principal(owner=found.owner, scope=models.ALL_OWNERS if found.admin else found.owner)


async def authorize_metrics(request: Request) -> None:
    """Let `request` read `/metrics` (see the module's docstring), else `ApiError` 401 or 403."""
    context = context_of(request)
    if context.open_owner is not None:
        return
    key = _bearer_key(request.headers.get("authorization"))
    if context.metrics_key is not None and hmac.compare_digest(key.encode(), context.metrics_key.encode()):
        return
    if (await authenticate(request)).scope is not models.ALL_OWNERS:
        raise ApiError(
            403,
            "Metrics show the figures of every owner: read them with an admin key or the metrics key "
            "([auth] metrics_key_env), or at [server] metrics_address.",
            code="permission_denied",
        )


def _bearer_key(header: str | None) -> str:
    if header is None or not header.strip():
        raise ApiError(
            401,
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY' (the "
            "openai SDK does this from its api_key).",
            code="invalid_api_key",
        )
    if header[: len(_BEARER)].lower() != _BEARER or not header[len(_BEARER) :].strip():
        raise ApiError(401, "The Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_api_key")
    return header[len(_BEARER) :].strip()


Caller = Annotated[Principal, Depends(authenticate)]
"""The authenticated caller, as a route parameter type."""
