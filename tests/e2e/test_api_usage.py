"""`GET /v1/usage` over a real socket with a raw HTTP client (aiohttp), each test once per backend: an owner's
usage and cost by model, day and batch; an admin's view of every owner; owner isolation; bad parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import aiohttp
import pytest

from fusillade.domain import ids
from fusillade.domain.prices import Prices
from fusillade.domain.usage import Pricing, Usage
from fusillade.storage import base
from tests.e2e.api_client import Client, assert_error
from tests.support import factories
from tests.support.api_server import ADMIN_KEY, RunningApi, create_key, running_api

PRICES: Final = Prices(routed={"model-a": Pricing.per_million(input="0.15", cached_input="0.075", output="0.6")})
"""model-a is priced; model-b is not."""
ALICE_A: Final = Usage(input_tokens=1_000_000, cached_tokens=200_000, output_tokens=500_000, reasoning_tokens=100)
ALICE_A_COST: Final = {"currency": "usd", "input": 0.135, "output": 0.3, "total": 0.435}
"""800k input at 0.15 + 200k cached at 0.075; 500k output at 0.6 (USD per million)."""


def usage_shape(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


@pytest.fixture
async def priced_api(storage: base.Storage) -> AsyncIterator[RunningApi]:
    async with running_api(storage, prices=PRICES) as running:
        yield running


@pytest.fixture
async def spent(storage: base.Storage) -> dict[str, ids.BatchId]:
    """alice: 3 model-a requests (one without usage) and 1 model-b request; bob: 1 model-a request."""
    return {
        "alice-a": await factories.completed_with_usage(storage, [ALICE_A, None], owner="alice"),
        "alice-b": await factories.completed_with_usage(
            storage, [Usage(40, 0, 2, 0)], owner="alice", model="model-b"
        ),
        "bob-a": await factories.completed_with_usage(storage, [Usage(7, 0, 3, 0)], owner="bob"),
    }


async def get_usage(client: Client, **query: str | int) -> dict[str, Any]:
    status, _, body = await client.call("GET", "/v1/usage", params=query)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def test_an_owner_reads_its_own_usage_and_cost_by_model(
    http: aiohttp.ClientSession, priced_api: RunningApi, spent: dict[str, ids.BatchId]
) -> None:
    alice = Client(http, priced_api, await create_key(priced_api.storage, "alice"))
    body = await get_usage(alice)
    assert body == {
        "object": "list",
        "group_by": "model",
        "since": None,
        "data": [
            {
                "owner": "alice",
                "model": "model-a",
                "requests": 2,
                "requests_without_usage": 1,
                "usage": usage_shape(ALICE_A),
                "cost": ALICE_A_COST,
            },
            {
                "owner": "alice",
                "model": "model-b",
                "requests": 1,
                "requests_without_usage": 0,
                "usage": usage_shape(Usage(40, 0, 2, 0)),
                "cost": None,  # no pricing for model-b
            },
        ],
        "total": {
            "requests": 3,
            "requests_without_usage": 1,
            "usage": usage_shape(ALICE_A + Usage(40, 0, 2, 0)),
            "cost": None,  # a model without pricing: the total would not be exact
        },
    }
    bob = Client(http, priced_api, await create_key(priced_api.storage, "bob"))
    assert (await get_usage(bob))["total"] == {
        "requests": 1,
        "requests_without_usage": 0,
        "usage": usage_shape(Usage(7, 0, 3, 0)),
        "cost": {"currency": "usd", "input": 1.05e-6, "output": 1.8e-6, "total": 2.85e-6},
    }


async def test_by_batch_and_by_day_with_since(
    http: aiohttp.ClientSession, priced_api: RunningApi, spent: dict[str, ids.BatchId]
) -> None:
    alice = Client(http, priced_api, await create_key(priced_api.storage, "alice"))
    by_batch = await get_usage(alice, group_by="batch")
    # Batches whose usage starts on the same day come in the order of their ids.
    assert [(row["batch_id"], row["model"], row["requests"]) for row in by_batch["data"]] == sorted(
        [(ids.batch_wire(spent["alice-a"]), "model-a", 2), (ids.batch_wire(spent["alice-b"]), "model-b", 1)]
    )
    [batch_a] = [row for row in by_batch["data"] if row["model"] == "model-a"]
    assert batch_a["cost"] == ALICE_A_COST and "day" not in batch_a

    by_day = await get_usage(alice, group_by="day")
    day = date.fromisoformat(by_day["data"][0]["day"])
    today = datetime.now(UTC).date()
    assert day in (today, today - timedelta(days=1))  # the UTC day they completed on (midnight may have passed)
    assert [(row["day"], row["model"]) for row in by_day["data"]] == [
        (day.isoformat(), "model-a"),
        (day.isoformat(), "model-b"),
    ]
    since_that_day = await get_usage(alice, group_by="day", since=day.isoformat())
    assert since_that_day["since"] == day.isoformat() and since_that_day["data"] == by_day["data"]
    # Unix seconds: the UTC day holding that moment.
    late_that_day = int(datetime.combine(day, time(23, 59), tzinfo=UTC).timestamp())
    by_seconds = await get_usage(alice, group_by="day", since=late_that_day)
    assert by_seconds["since"] == day.isoformat() and by_seconds["data"] == by_day["data"]
    next_day = await get_usage(alice, since=(day + timedelta(days=1)).isoformat())
    assert next_day["data"] == []
    assert next_day["total"]["requests"] == 0 and next_day["total"]["usage"]["total_tokens"] == 0


async def test_an_admin_sees_every_owner_and_may_pick_one(
    http: aiohttp.ClientSession, priced_api: RunningApi, spent: dict[str, ids.BatchId]
) -> None:
    admin = Client(http, priced_api, ADMIN_KEY)
    everyone = await get_usage(admin)
    assert [(row["owner"], row["model"], row["requests"]) for row in everyone["data"]] == [
        ("alice", "model-a", 2),
        ("alice", "model-b", 1),
        ("bob", "model-a", 1),
    ]
    assert everyone["total"]["requests"] == 4
    only_bob = await get_usage(admin, owner="bob")
    assert [(row["owner"], row["model"]) for row in only_bob["data"]] == [("bob", "model-a")]
    assert (await get_usage(admin, owner="nobody"))["data"] == []


async def test_an_owner_never_sees_another_owners_usage(
    http: aiohttp.ClientSession, priced_api: RunningApi, spent: dict[str, ids.BatchId]
) -> None:
    bob = Client(http, priced_api, await create_key(priced_api.storage, "bob"))
    status, _, body = await bob.call("GET", "/v1/usage", params={"owner": "alice"})
    assert status == 403
    assert_error(body, code="permission_denied", param="owner")
    assert "admin" in body["error"]["message"]
    # Naming itself is allowed, and gives its own rows only.
    own = await get_usage(bob, owner="bob", group_by="batch")
    assert [(row["owner"], row["batch_id"]) for row in own["data"]] == [("bob", ids.batch_wire(spent["bob-a"]))]
    carol = Client(http, priced_api, await create_key(priced_api.storage, "carol"))
    assert (await get_usage(carol))["data"] == []


@pytest.mark.parametrize(
    ("query", "param", "quoted"),
    [
        ({"group_by": "week"}, "group_by", "model, day, batch"),
        ({"since": "2026-13-01"}, "since", "not a date of the calendar"),
        ({"since": "yesterday"}, "since", "YYYY-MM-DD or Unix seconds"),
        ({"since": "-5"}, "since", "YYYY-MM-DD or Unix seconds"),
    ],
)
async def test_bad_parameters_are_a_400_that_says_what_is_accepted(
    http: aiohttp.ClientSession, priced_api: RunningApi, query: dict[str, str], param: str, quoted: str
) -> None:
    alice = Client(http, priced_api, await create_key(priced_api.storage, "alice"))
    status, headers, body = await alice.call("GET", "/v1/usage", params=query)
    assert status == 400
    error = assert_error(body, code="invalid_value", param=param)
    assert quoted in error["message"] and error["message"].startswith(f"{param}: ")
    assert headers["x-should-retry"] == "false"


async def test_no_key_is_a_401(http: aiohttp.ClientSession, priced_api: RunningApi) -> None:
    status, _, body = await Client(http, priced_api, None).call("GET", "/v1/usage")
    assert status == 401
    assert_error(body, code="invalid_api_key")
