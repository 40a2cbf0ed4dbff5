"""`/v1/models` over a real socket with a raw HTTP client (aiohttp), each test once per backend: the OpenAI list
shape, ids with slashes (encoded or not), 404 for anything not served, tenancy of the default route's models, the
routing table in force; and the served models named by an upload refused for a model without a route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import yarl

from fusillade.domain import served
from fusillade.storage import base
from tests.e2e.api_client import assert_error, bearer, form, request_lines
from tests.support.api_server import ADMIN_KEY, RunningApi, create_key, routed, running_api

LOADED = datetime(2026, 1, 1, tzinfo=UTC)
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
MODEL_FIELDS = {"id", "object", "created", "owned_by"}


class Routing:
    """The routing table in force; a test replaces `table` as a configuration reload does."""

    def __init__(self, table: served.ServedModels) -> None:
        self.table = table

    def __call__(self) -> served.ServedModels:
        return self.table


@pytest.fixture
def routing() -> Routing:
    return Routing(routed("model-a", LLAMA, default_route=True, now=LOADED))


@pytest.fixture
async def api(storage: base.Storage, routing: Routing) -> AsyncIterator[RunningApi]:
    async with running_api(storage, served_models=routing) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, api: RunningApi, path: str, key: str | None) -> tuple[int, Any]:
    """GET `path` sent exactly as written (percent-escapes kept)."""
    headers = bearer(key) if key is not None else {}
    async with http.get(yarl.URL(api.url + path, encoded=True), headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def upload(http: aiohttp.ClientSession, api: RunningApi, key: str, model: str) -> tuple[int, Any]:
    async with http.post(
        api.url + "/v1/files", data=form(request_lines(2, model=model)), headers=bearer(key)
    ) as response:
        return response.status, await response.json()


def names(listing: Any) -> list[str]:
    assert set(listing) == {"object", "data"}
    assert listing["object"] == "list"
    for model in listing["data"]:
        assert set(model) == MODEL_FIELDS
        assert (model["object"], model["owned_by"]) == ("model", "fusillade")
        assert isinstance(model["created"], int)
    return [model["id"] for model in listing["data"]]


async def test_models_are_listed_and_default_route_models_only_to_their_owner(
    http: aiohttp.ClientSession, api: RunningApi
) -> None:
    alice, bob = await create_key(api.storage, "alice"), await create_key(api.storage, "bob")
    before = int(datetime.now(UTC).timestamp())
    assert (await upload(http, api, alice, "alice-secret-project"))[0] == 200
    assert (await upload(http, api, bob, "model-a"))[0] == 200  # a route of its own: nothing recorded

    status, as_alice = await get(http, api, "/v1/models", alice)
    assert status == 200
    assert names(as_alice) == ["meta-llama/Llama-3.1-8B-Instruct", "model-a", "alice-secret-project"]
    created = {model["id"]: model["created"] for model in as_alice["data"]}
    assert created["model-a"] == int(LOADED.timestamp())
    assert created["alice-secret-project"] >= before
    assert names((await get(http, api, "/v1/models", bob))[1]) == [LLAMA, "model-a"]
    assert names((await get(http, api, "/v1/models", ADMIN_KEY))[1]) == [LLAMA, "model-a", "alice-secret-project"]

    status, found = await get(http, api, "/v1/models/alice-secret-project", alice)
    assert (status, found["id"], found["created"]) == (
        200,
        "alice-secret-project",
        created["alice-secret-project"],
    )
    status, body = await get(http, api, "/v1/models/alice-secret-project", bob)
    assert status == 404
    assert "alice-secret-project" in assert_error(body, code="not_found")["message"]


async def test_a_model_id_with_slashes_is_found_encoded_or_not(
    http: aiohttp.ClientSession, api: RunningApi
) -> None:
    key = await create_key(api.storage, "alice")

    for path in ["/v1/models/meta-llama%2FLlama-3.1-8B-Instruct", "/v1/models/meta-llama/Llama-3.1-8B-Instruct"]:
        status, body = await get(http, api, path, key)
        assert (status, body) == (
            200,
            {"id": LLAMA, "object": "model", "created": int(LOADED.timestamp()), "owned_by": "fusillade"},
        ), path


async def test_anything_not_served_is_a_404_in_the_error_envelope(
    http: aiohttp.ClientSession, api: RunningApi
) -> None:
    key = await create_key(api.storage, "alice")
    odd = ["gpt-9", "x" * 10_000, "nul%00inside", "bad%FFutf8", "line%0Abreak", "%2E%2E%2Fetc", "model-a/", "%20"]

    for model in odd:
        status, body = await get(http, api, f"/v1/models/{model}", key)
        assert status == 404, model
        assert_error(body, code="not_found")
    async with http.delete(api.url + "/v1/models/model-a", headers=bearer(key)) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
    status, body = await get(http, api, "/v1/models", None)
    assert status == 401
    assert_error(body, code="invalid_api_key")
    status, body = await get(http, api, f"/v1/models/{LLAMA}", "fus_unknown")
    assert status == 401


async def test_the_listing_follows_a_reload_of_the_routing_table(
    http: aiohttp.ClientSession, api: RunningApi, routing: Routing
) -> None:
    key = await create_key(api.storage, "alice")
    assert (await upload(http, api, key, "via-default"))[0] == 200
    reloaded = LOADED + timedelta(hours=1)

    routing.table = served.ServedModels.of(
        ["model-a", "new"], default_route=False, now=reloaded, previous=routing.table
    )

    _, listing = await get(http, api, "/v1/models", key)
    assert [(model["id"], model["created"]) for model in listing["data"]] == [
        ("model-a", int(LOADED.timestamp())),
        ("new", int(reloaded.timestamp())),
    ]
    assert (await get(http, api, "/v1/models/via-default", key))[0] == 404


async def test_an_upload_for_a_model_without_a_route_names_twenty_served_models(
    http: aiohttp.ClientSession, storage: base.Storage
) -> None:
    served_names = [f"model-{index:02}" for index in range(25)]
    async with running_api(storage, served_models=Routing(routed(*served_names))) as api:
        key = await create_key(storage, "alice")
        status, body = await upload(http, api, key, "gpt-9")

    assert status == 400
    error = assert_error(body, code="invalid_file", param="file")
    listed = ", ".join(served_names[:20])
    expected = f"model 'gpt-9' has no route configured on this server; served models: {listed} (and 5 more)."
    assert [(line["line"], line["message"]) for line in error["lines"]] == [
        (1, expected),
        (2, "model 'gpt-9' has no route configured on this server; the served models are named on line 1."),
    ]
    assert f"line 1: {expected}" in error["message"]
    assert "model-20" not in error["message"]
