"""Access to the HTTP API over a real socket with a raw HTTP client (aiohttp), each test once per backend:
tenancy (owners never see each other's objects, admins see all), API keys and open mode, health, readiness and
metrics, an unavailable database, and the error envelope of unknown paths and malformed ids."""

from __future__ import annotations

import uuid

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from fusillade.domain import ids, models
from fusillade.storage import base
from tests.e2e.api_client import CHAT, Client, assert_error, bearer, request_lines
from tests.support.api_server import ADMIN_KEY, FlakyStorage, RunningApi, create_key, running_api

# ---------------------------------------------------------------------------------------------- tenancy


async def test_owners_cannot_see_or_touch_each_others_objects(
    http: aiohttp.ClientSession, api: RunningApi, alice: str, bob: str
) -> None:
    alice_client, bob_client = Client(http, api, alice), Client(http, api, bob)
    file_id = (await alice_client.upload(request_lines(2)))["id"]
    batch = await alice_client.create_batch(file_id)
    await bob_client.upload(request_lines(1))

    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/batches/{batch['id']}"),
        ("POST", f"/v1/batches/{batch['id']}/cancel"),
        ("GET", f"/v1/batches/{batch['id']}/requests"),
        ("POST", f"/v1/batches/{batch['id']}/retry"),
        ("GET", "/v1/files/file-" + "0" * 32),
    ]:
        status, _, body = await bob_client.call(method, path)
        assert status == 404, (method, path)
        assert_error(body, code="not_found")
    status, _, body = await bob_client.call(
        "POST", "/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT}
    )
    assert status == 404
    _, _, bob_files = await bob_client.call("GET", "/v1/files")
    _, _, bob_batches = await bob_client.call("GET", "/v1/batches")
    assert file_id not in {item["id"] for item in bob_files["data"]} and len(bob_files["data"]) == 1
    assert bob_batches["data"] == []
    status, _, still_there = await alice_client.call("GET", f"/v1/batches/{batch['id']}")
    assert status == 200 and still_there["status"] == "in_progress"

    for admin in (ADMIN_KEY, await create_key(api.storage, "ops", admin=True)):
        admin_client = Client(http, api, admin)
        _, _, every_file = await admin_client.call("GET", "/v1/files", params={"purpose": "batch"})
        assert len(every_file["data"]) == 2
        status, _, seen = await admin_client.call("GET", f"/v1/batches/{batch['id']}")
        assert status == 200 and seen["id"] == batch["id"]


async def test_the_configured_admin_key_creates_objects_as_owner_admin(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    admin_client = Client(http, api, ADMIN_KEY)
    file_id = (await admin_client.upload(request_lines(1)))["id"]

    stored = await api.storage.get_file(ids.parse_file_id(file_id), owner=models.ALL_OWNERS)

    assert stored.owner == "admin"
    status, _, _ = await Client(http, api, alice).call("GET", f"/v1/files/{file_id}")
    assert status == 404


# ------------------------------------------------------------------------------------------------- auth


async def test_requests_without_a_valid_key_are_refused(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}, bearer("fus_unknown")):
        async with http.get(api.url + "/v1/batches", headers=headers) as response:
            assert response.status == 401, headers
            assert response.headers["x-should-retry"] == "false"
            assert_error(await response.json(), code="invalid_api_key")

    client = Client(http, api, alice)
    assert (await client.call("GET", "/v1/files"))[0] == 200
    (stored,) = [key for key in await api.storage.list_api_keys() if key.owner == "alice"]
    await api.storage.revoke_api_key(stored.id)
    status, _, body = await client.call("GET", "/v1/files")
    assert status == 401, "a revoked key stops working at once"
    assert_error(body, code="invalid_api_key")


async def test_open_mode_serves_one_owner_whatever_the_key(
    http: aiohttp.ClientSession, storage: base.Storage
) -> None:
    async with running_api(storage, open_owner="local", admin_key=None) as api:
        with_key = Client(http, api, "anything-the-sdk-sends")
        without_key = Client(http, api, None)
        file_id = (await with_key.upload(request_lines(1)))["id"]
        status, _, seen = await without_key.call("GET", f"/v1/files/{file_id}")

    assert status == 200 and seen["id"] == file_id
    stored = await storage.get_file(ids.parse_file_id(file_id), owner=models.ALL_OWNERS)
    assert stored.owner == "local"


# ------------------------------------------------------------------------------------- health and errors


async def test_health_readiness_and_metrics(
    http: aiohttp.ClientSession, api: RunningApi, registry: CollectorRegistry, alice: str
) -> None:
    Counter("fusillade_test_events", "A metric of the test.", registry=registry).inc(3)
    anonymous = Client(http, api, None)

    assert (await anonymous.call("GET", "/healthz"))[::2] == (200, {"status": "ok"})
    assert (await anonymous.call("GET", "/readyz"))[::2] == (200, {"status": "ready"})
    status, _, body = await anonymous.call("GET", "/metrics")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _, body = await Client(http, api, alice).call("GET", "/metrics")
    assert status == 403 and body["error"]["code"] == "permission_denied"
    for admin in (ADMIN_KEY, await create_key(api.storage, "ops", admin=True)):
        status, headers, text = await Client(http, api, admin).call("GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b"fusillade_test_events_total 3.0" in text


async def test_metrics_open_to_the_metrics_key_and_in_open_mode(
    http: aiohttp.ClientSession, storage: base.Storage
) -> None:
    metrics_key = f"fus_metrics-{uuid.uuid4().hex}"
    registry = CollectorRegistry()
    Counter("fusillade_test_events", "A metric of the test.", registry=registry).inc()
    async with running_api(storage, metrics_key=metrics_key, registry=registry) as api:
        status, _, text = await Client(http, api, metrics_key).call("GET", "/metrics")
        assert status == 200 and b"fusillade_test_events_total 1.0" in text
        status, _, body = await Client(http, api, metrics_key).call("GET", "/v1/files")
        assert status == 401, "the metrics key opened more than /metrics"
        status, _, body = await Client(http, api, metrics_key + "x").call("GET", "/metrics")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    async with running_api(storage, admin_key=None, open_owner="local", registry=registry) as api:
        status, _, text = await Client(http, api, None).call("GET", "/metrics")
        assert status == 200 and b"fusillade_test_events_total 1.0" in text


async def test_an_unavailable_database_answers_503_with_retry_after(
    http: aiohttp.ClientSession, storage: base.Storage
) -> None:
    flaky = FlakyStorage(storage)
    async with running_api(flaky.as_storage()) as api:
        key = await create_key(storage, "alice")
        client = Client(http, api, key)
        file_id = (await client.upload(request_lines(1)))["id"]
        batch_id = (await client.create_batch(file_id))["id"]
        flaky.down = True
        status, headers, body = await client.call("GET", f"/v1/batches/{batch_id}")
        ready_status, ready_headers, _ = await client.call("GET", "/readyz")
        flaky.down = False
        recovered, _, _ = await client.call("GET", f"/v1/batches/{batch_id}")

    assert status == 503
    assert headers["Retry-After"] == "1"
    assert "x-should-retry" not in headers
    assert_error(body, code="storage_unavailable")
    assert body["error"]["type"] == "server_error"
    assert (ready_status, ready_headers["Retry-After"]) == (503, "1")
    assert recovered == 200


async def test_unknown_paths_and_malformed_ids_answer_the_error_envelope(
    http: aiohttp.ClientSession, api: RunningApi, alice: str
) -> None:
    client = Client(http, api, alice)

    status, _, body = await client.call("GET", "/v1/fine_tuning/jobs")
    assert status == 404
    assert_error(body, code="not_found")
    status, _, body = await client.call("GET", "/v1/batches/batch_req_" + "0" * 32)
    assert status == 404
    assert_error(body, code="not_found")
    status, _, body = await client.call("PUT", "/v1/batches")
    assert status == 405
    assert_error(body, code="method_not_allowed")
    status, _, body = await client.call(
        "POST", "/v1/batches", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert body["error"]["code"] == "invalid_value"
