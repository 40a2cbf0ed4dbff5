"""The service's use cases on a real storage (each test once per backend): uploads spooled and validated as
streams, batch creation checks and its retry rules, and the wake-ups it sends to the daemon."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import jsonl, models, served
from fusillade.service import RETRY_WINDOW, InvalidParameter, Service
from fusillade.storage import base
from tests.support import backends, factories

OWNER = factories.OWNER
CHAT = factories.CHAT


@pytest.fixture
def clock() -> clocks.ManualClock:
    return clocks.ManualClock()


@pytest.fixture
async def storage(backend: backends.Backend, clock: clocks.ManualClock) -> base.Storage:
    store: base.Storage = await backend.open_store(clock)
    if not backend.is_postgres:
        await store.migrate()
    return store


class Wakeups:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def wakeups() -> Wakeups:
    return Wakeups()


@pytest.fixture
def service(storage: base.Storage, clock: clocks.ManualClock, wakeups: Wakeups, spool: Path) -> Service:
    return Service(
        storage,
        limits=jsonl.Limits(max_bytes=100_000),
        model_allowed={"model-a", "model-b"}.__contains__,
        spool_directory=spool,
        notify_work=wakeups,
        clock=clock,
    )


def line(custom_id: str, model: str = "model-a", url: str = CHAT) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {custom_id}"}]}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + b"\n"


async def in_chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_an_upload_in_small_chunks_is_stored_whole_and_leaves_no_spool_file(
    service: Service, storage: base.Storage, spool: Path
) -> None:
    data = b"".join(line(f"req-{n}") for n in range(1, 41))

    file = await service.upload_file(owner=OWNER, filename="dir/sub/input.jsonl", chunks=in_chunks(data, 7))

    assert (file.request_count, file.bytes, file.filename) == (40, len(data), "input.jsonl")
    stored = await factories.read_lines(storage, file.id)
    assert [item["custom_id"] for item in stored] == [f"req-{n}" for n in range(1, 41)]
    assert os.listdir(spool) == []


async def test_bad_lines_are_all_reported_by_number_and_nothing_is_stored(
    service: Service, storage: base.Storage, spool: Path
) -> None:
    data = line("a") + b"{not json\n" + line("b", model="unrouted") + line("a") + line("c")

    with pytest.raises(InvalidParameter) as caught:
        await service.upload_file(owner=OWNER, filename="in.jsonl", chunks=in_chunks(data, 16))

    assert caught.value.param == "file"
    assert [item.line for item in caught.value.errors] == [2, 3, 4]
    assert "no route" in caught.value.errors[1].reason
    assert "used again" in caught.value.errors[2].reason
    assert (await storage.list_files(owner=models.ALL_OWNERS)).items == []
    assert os.listdir(spool) == []


async def test_an_upload_over_the_byte_limit_stops_reading_at_once(
    service: Service, storage: base.Storage
) -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield line(f"r{pulled}").ljust(1000, b" ")

    with pytest.raises(InvalidParameter) as caught:
        await service.upload_file(owner=OWNER, filename="big.jsonl", chunks=endless())

    assert "larger than 100,000 bytes" in caught.value.message
    assert pulled == 101
    assert (await storage.list_files(owner=models.ALL_OWNERS)).items == []


async def test_an_error_raised_by_the_chunks_propagates_unchanged(service: Service, storage: base.Storage) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield line("a")
        raise InvalidParameter("purpose", "purpose is missing")

    with pytest.raises(InvalidParameter) as caught:
        await service.upload_file(owner=OWNER, filename="in.jsonl", chunks=broken())

    assert caught.value.param == "purpose"
    assert (await storage.list_files(owner=models.ALL_OWNERS)).items == []


async def test_new_limits_apply_to_the_next_upload(service: Service) -> None:
    data = line("a") + line("b") + line("c")
    service.replace_limits(jsonl.Limits(max_lines=2))

    with pytest.raises(InvalidParameter, match="more than 2 requests"):
        await service.upload_file(owner=OWNER, filename="in.jsonl", chunks=in_chunks(data, 64))

    assert service.limits.max_lines == 2


async def test_upload_path_reads_a_local_file(service: Service, storage: base.Storage, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(line("x") + line("y"))

    file = await service.upload_path(owner=OWNER, path=path)

    assert (file.filename, file.request_count) == ("requests.jsonl", 2)
    with pytest.raises(InvalidParameter, match="Cannot read"):
        await service.upload_path(owner=OWNER, path=tmp_path / "missing.jsonl")


async def test_create_batch_checks_its_parameters_and_wakes_the_daemon(
    service: Service, storage: base.Storage, wakeups: Wakeups
) -> None:
    file = await factories.upload(storage)

    def spec(**changes: object) -> models.BatchSpec:
        values: dict[str, object] = {"owner": OWNER, "input_file_id": file.id, "endpoint": CHAT}
        values.update(changes)
        return models.BatchSpec(**values)  # type: ignore[arg-type]

    bad = {
        "endpoint": spec(endpoint="/v1/images/generations"),
        "completion_window": spec(completion_window="soon"),
        "metadata": spec(metadata={f"k{n}": "v" for n in range(17)}),
        "Idempotency-Key": spec(idempotency_key="k" * 256),
    }
    for param, wrong in bad.items():
        with pytest.raises(InvalidParameter) as caught:
            await service.create_batch(wrong)
        assert caught.value.param == param
    assert wakeups.count == 0

    batch = await service.create_batch(spec(metadata={"team": "search"}))

    assert batch.counts.total == 3
    assert wakeups.count == 1


async def test_a_file_whose_urls_differ_from_the_endpoint_is_refused_with_line_numbers(
    service: Service, storage: base.Storage
) -> None:
    file = await factories.upload(storage, count=3, urls_by_line={2: "/v1/embeddings"})

    with pytest.raises(errors.ValidationError) as caught:
        await service.create_batch(models.BatchSpec(owner=OWNER, input_file_id=file.id, endpoint=CHAT))

    assert [item.line for item in caught.value.errors] == [2]


async def test_a_retried_create_returns_the_batch_of_its_first_attempt(
    service: Service, storage: base.Storage, clock: clocks.ManualClock
) -> None:
    file = await factories.upload(storage)
    spec = models.BatchSpec(owner=OWNER, input_file_id=file.id, endpoint=CHAT, metadata={"run": "1"})

    first = await service.create_batch(spec)
    retried = await service.create_batch(spec, retried=True)
    on_purpose = await service.create_batch(spec)
    other_metadata = await service.create_batch(
        models.BatchSpec(owner=OWNER, input_file_id=file.id, endpoint=CHAT, metadata={"run": "2"}), retried=True
    )

    assert retried.id == first.id
    assert on_purpose.id != first.id, "a create that is not a retry always makes a batch"
    assert other_metadata.id not in (first.id, on_purpose.id)

    clock.advance(RETRY_WINDOW + timedelta(seconds=1))
    late = await service.create_batch(
        models.BatchSpec(owner=OWNER, input_file_id=file.id, endpoint=CHAT, metadata={"run": "2"}), retried=True
    )
    assert late.id != other_metadata.id
    assert len((await storage.list_batches(owner=OWNER)).items) == 4


async def test_a_retry_arriving_while_its_first_attempt_runs_waits_for_it(
    service: Service, storage: base.Storage
) -> None:
    file = await factories.upload(storage, count=500)
    spec = models.BatchSpec(owner=OWNER, input_file_id=file.id, endpoint=CHAT)

    first, retried = await asyncio.gather(service.create_batch(spec), service.create_batch(spec, retried=True))

    assert first.id == retried.id
    assert [batch.id for batch in (await storage.list_batches(owner=OWNER)).items] == [first.id]


async def test_an_idempotency_key_returns_the_first_batch(service: Service, storage: base.Storage) -> None:
    file = await factories.upload(storage)
    spec = models.BatchSpec(owner=OWNER, input_file_id=file.id, endpoint=CHAT, idempotency_key="nightly-42")

    first = await service.create_batch(spec)
    second = await service.create_batch(spec)

    assert second.id == first.id
    assert len((await storage.list_batches(owner=OWNER)).items) == 1


async def test_retry_failed_wakes_the_daemon_only_when_requests_moved(
    service: Service, storage: base.Storage, wakeups: Wakeups
) -> None:
    batch = await factories.create_batch(storage, count=3)
    await factories.run_to_completion(storage, batch, failing=2)

    retried = await service.retry_failed(batch.id, owner=OWNER)
    assert (retried.counts.pending, retried.counts.failed) == (2, 0)
    assert wakeups.count == 1
    again = await service.retry_failed(batch.id, owner=OWNER)
    assert again.counts.pending == 2
    assert wakeups.count == 1


# ------------------------------------------------------------------------------------------------- models


class Routing:
    """A routing table the test replaces, as a configuration reload does."""

    def __init__(self, clock: clocks.ManualClock, *names: str, default_route: bool) -> None:
        self.clock = clock
        self.table = served.ServedModels.of(names, default_route=default_route, now=clock.now())

    def replace(self, *names: str, default_route: bool) -> None:
        self.table = served.ServedModels.of(
            names, default_route=default_route, now=self.clock.now(), previous=self.table
        )

    def __call__(self) -> served.ServedModels:
        return self.table


def listed(found: list[served.ListedModel]) -> list[tuple[str, datetime, bool]]:
    return [(model.name, model.created_at, model.default_route) for model in found]


async def test_models_of_the_default_route_are_recorded_at_upload_and_listed_to_their_owner_only(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    routing = Routing(clock, "model-a", default_route=True)
    service = Service(storage, limits=jsonl.DEFAULT_LIMITS, served_models=routing, clock=clock)
    loaded = clock.now()
    clock.advance(timedelta(minutes=1))
    uploaded_at = clock.now()
    data = line("1", model="model-a") + line("2", model="alice-secret-project") + line("3", model="org/tuned")

    await service.upload_file(owner="alice", filename="in.jsonl", chunks=in_chunks(data, 64))

    assert listed(await service.list_models(owner="alice")) == [
        ("model-a", loaded, False),
        ("alice-secret-project", uploaded_at, True),
        ("org/tuned", uploaded_at, True),
    ]
    assert listed(await service.list_models(owner="bob")) == [("model-a", loaded, False)]
    assert [model.name for model in await service.list_models(owner=models.ALL_OWNERS)] == [
        "model-a",
        "alice-secret-project",
        "org/tuned",
    ]
    found = await service.get_model("org/tuned", owner="alice")
    assert (found.name, found.created_at, found.default_route) == ("org/tuned", uploaded_at, True)
    assert (await service.get_model("model-a", owner="bob")).created_at == loaded
    with pytest.raises(errors.NotFound):
        await service.get_model("alice-secret-project", owner="bob")


async def test_the_listing_follows_the_routing_table_in_force(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    routing = Routing(clock, "model-a", default_route=True)
    service = Service(storage, limits=jsonl.DEFAULT_LIMITS, served_models=routing, clock=clock)
    await service.upload_file(owner="alice", filename="in.jsonl", chunks=in_chunks(line("1", model="later"), 64))
    loaded = clock.now()
    clock.advance(timedelta(minutes=1))

    # A reload: a new route, and no default route any more.
    routing.replace("model-a", "model-b", default_route=False)

    assert listed(await service.list_models(owner="alice")) == [
        ("model-a", loaded, False),
        ("model-b", clock.now(), False),
    ]
    with pytest.raises(errors.NotFound):
        await service.get_model("later", owner="alice")
    with pytest.raises(InvalidParameter) as caught:
        await service.upload_file(owner="alice", filename="in.jsonl", chunks=in_chunks(line("1", model="x"), 64))
    assert [item.reason for item in caught.value.errors] == [
        "model 'x' has no route configured on this server; served models: model-a, model-b."
    ]


async def test_an_unknown_or_odd_model_is_not_found(storage: base.Storage, clock: clocks.ManualClock) -> None:
    service = Service(
        storage, limits=jsonl.DEFAULT_LIMITS, served_models=Routing(clock, "model-a", default_route=True)
    )

    for name in ["missing", "", "x" * 100_000, "nul\x00inside", "lone \ud800", "../../etc/passwd", "%2F"]:
        with pytest.raises(errors.NotFound):
            await service.get_model(name, owner="alice")


async def test_without_a_default_route_no_model_is_recorded(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    service = Service(
        storage, limits=jsonl.DEFAULT_LIMITS, served_models=Routing(clock, "model-a", default_route=False)
    )

    await service.upload_file(owner="alice", filename="in.jsonl", chunks=in_chunks(line("1"), 64))

    assert await storage.list_models_seen(owner=models.ALL_OWNERS) == []
    assert [model.name for model in await service.list_models(owner="alice")] == ["model-a"]


def test_a_service_needs_to_know_which_models_it_accepts(storage: base.Storage) -> None:
    with pytest.raises(ValueError, match="served_models"):
        Service(storage, limits=jsonl.DEFAULT_LIMITS)
