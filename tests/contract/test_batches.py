"""BatchStore: creating batches (refusals, idempotency), reading, listing, deleting, listing requests."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, models, states
from fusillade.storage import base
from tests.support import backends, factories

SECOND = timedelta(seconds=1)


async def test_create_batch(storage: base.Storage, clock: clocks.ManualClock) -> None:
    file = await factories.upload(storage, count=3)
    clock.advance(SECOND)
    batch = await storage.create_batch(
        models.BatchSpec(
            owner="alice",
            input_file_id=file.id,
            endpoint=factories.CHAT,
            completion_window="2h",
            metadata={"project": "x"},
        )
    )
    now = clock.now()
    assert batch.owner == "alice"
    assert batch.input_file_id == file.id
    assert batch.endpoint == factories.CHAT
    assert batch.completion_window == "2h"
    assert dict(batch.metadata or {}) == {"project": "x"}
    assert batch.created_at == now
    assert batch.in_progress_at == now
    assert batch.expires_at == now + timedelta(hours=2)
    assert batch.finalizing_at is None and batch.completed_at is None and batch.cancelling_at is None
    assert batch.status is states.BatchStatus.IN_PROGRESS
    assert batch.counts == models.RequestCounts(total=3, pending=3)
    assert list(batch.errors) == []
    assert batch.output_file_id != batch.error_file_id
    clock.advance(SECOND)
    assert await storage.get_batch(batch.id, owner="alice") == batch


async def listed_file_ids(storage: base.Storage, owner: str) -> set[ids.FileId]:
    return {file.id for file in (await storage.list_files(owner=owner)).items}


async def test_result_files_appear_with_their_first_line(storage: base.Storage) -> None:
    """As on OpenAI: a batch's output and error files exist once they have a line. Before, they are neither
    found (get, content, delete) nor listed, for their owner as for anyone."""
    batch = await factories.create_batch(storage, count=3)
    result_files = (batch.output_file_id, batch.error_file_id)
    for file_id in result_files:
        for owner in ("alice", "bob", models.ALL_OWNERS):
            with pytest.raises(errors.NotFound):
                await storage.get_file(file_id, owner=owner)
        with pytest.raises(errors.NotFound):
            await factories.read_content(storage, file_id, owner="alice")
        with pytest.raises(errors.NotFound):
            await storage.delete_file(file_id, owner="alice")
    assert await listed_file_ids(storage, "alice") == {batch.input_file_id}
    assert (await storage.list_files(owner="alice", purpose=states.FilePurpose.BATCH_ERROR)).items == []

    daemon = await factories.register(storage)
    first, second, _ = [request.id for request in await factories.claim(storage, daemon, 3)]
    await factories.complete(storage, daemon, [first])

    output = await storage.get_file(batch.output_file_id, owner="alice")
    assert output.purpose is states.FilePurpose.BATCH_OUTPUT
    assert (output.owner, output.batch_id, output.request_count) == ("alice", batch.id, 1)
    assert output.created_at == batch.created_at
    assert output.filename == f"batch_{batch.id.hex}_output.jsonl"
    assert output.bytes == len(await factories.read_content(storage, batch.output_file_id, owner="alice")) > 0
    assert await listed_file_ids(storage, "alice") == {batch.input_file_id, batch.output_file_id}
    with pytest.raises(errors.NotFound):
        await storage.get_file(batch.error_file_id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.get_file(batch.output_file_id, owner="bob")

    await factories.fail(storage, daemon, [second])

    error = await storage.get_file(batch.error_file_id, owner="alice")
    assert (error.purpose, error.request_count) == (states.FilePurpose.BATCH_ERROR, 1)
    assert error.filename == f"batch_{batch.id.hex}_error.jsonl"
    assert await listed_file_ids(storage, "alice") == {batch.input_file_id, *result_files}
    page = await storage.list_files(owner="alice", purpose=states.FilePurpose.BATCH_ERROR)
    assert [file.id for file in page.items] == [batch.error_file_id]


async def test_create_batch_makes_one_pending_request_per_line(storage: base.Storage) -> None:
    items = factories.templates(models_by_line=["m1", "m2", "m1"], custom_ids=["x", "y", "z"])
    batch = await factories.create_batch(storage, file=await factories.upload(storage, items=items))
    requests = await factories.all_requests(storage, batch.id, owner="alice")
    assert [(r.line_number, r.custom_id, r.model) for r in requests] == [
        (1, "x", "m1"),
        (2, "y", "m2"),
        (3, "z", "m1"),
    ]
    for request in requests:
        assert request.batch_id == batch.id
        assert request.owner == "alice"
        assert request.state is states.RequestState.PENDING
        assert request.attempt == 0
        assert request.daemon_id is None and request.finished_at is None and request.not_before is None
    assert len({request.id for request in requests}) == 3
    assert batch.metadata is None
    assert batch.status is states.BatchStatus.IN_PROGRESS


async def test_create_batch_needs_the_owners_live_input_file(storage: base.Storage) -> None:
    file = await factories.upload(storage, owner="alice")
    spec = models.BatchSpec(owner="bob", input_file_id=file.id, endpoint=factories.CHAT)
    with pytest.raises(errors.NotFound):
        await storage.create_batch(spec)
    with pytest.raises(errors.NotFound):
        await storage.create_batch(models.BatchSpec(owner="alice", input_file_id=ids.new_file_id(), endpoint="x"))
    await storage.delete_file(file.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await factories.create_batch(storage, file=file)
    assert list((await storage.list_batches(owner=models.ALL_OWNERS)).items) == []


async def test_create_batch_rejects_an_output_file_as_input(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage)
    await factories.run_to_completion(storage, batch)
    output = await storage.get_file(batch.output_file_id, owner="alice")
    with pytest.raises(errors.ValidationError) as caught:
        await factories.create_batch(storage, file=output)
    assert caught.value.message == (
        f"File {ids.file_wire(output.id)} is not a batch input file (its purpose is batch_output); upload a file "
        "with purpose 'batch'."
    )
    assert len((await storage.list_batches(owner="alice")).items) == 1


async def test_create_batch_rejects_lines_of_another_endpoint(storage: base.Storage) -> None:
    file = await factories.upload(storage, count=4, urls_by_line={2: "/v1/embeddings", 4: "/v1/completions"})
    with pytest.raises(errors.ValidationError) as caught:
        await factories.create_batch(storage, file=file, endpoint=factories.CHAT)
    # The same words on every backend (storage.refusals).
    endpoint = f"the batch endpoint '{factories.CHAT}'"
    assert caught.value.message == f"File {ids.file_wire(file.id)} has lines whose url does not match {endpoint}."
    assert [(error.line, error.reason) for error in caught.value.errors] == [
        (2, f"url '/v1/embeddings' does not match {endpoint}"),
        (4, f"url '/v1/completions' does not match {endpoint}"),
    ]
    assert list((await storage.list_batches(owner=models.ALL_OWNERS)).items) == []
    assert [item.id for item in (await storage.list_files(owner="alice")).items] == [file.id]


@pytest.mark.parametrize("window", ["0h", "24", "forever", "-1h", ""])
async def test_create_batch_rejects_a_bad_completion_window(storage: base.Storage, window: str) -> None:
    file = await factories.upload(storage)
    with pytest.raises(errors.ValidationError):
        await factories.create_batch(storage, file=file, window=window)
    assert list((await storage.list_batches(owner=models.ALL_OWNERS)).items) == []


async def test_idempotency_key_returns_the_first_batch(storage: base.Storage, clock: clocks.ManualClock) -> None:
    file = await factories.upload(storage)
    first = await factories.create_batch(storage, file=file, idempotency_key="k1")
    clock.advance(SECOND)
    again = await factories.create_batch(storage, file=file, idempotency_key="k1")
    assert again.id == first.id
    assert again.created_at == first.created_at
    other_key = await factories.create_batch(storage, file=file, idempotency_key="k2")
    no_key = await factories.create_batch(storage, file=file)
    bob_file = await factories.upload(storage, owner="bob")
    bobs = await factories.create_batch(storage, owner="bob", file=bob_file, idempotency_key="k1")
    assert len({first.id, other_key.id, no_key.id, bobs.id}) == 4
    assert len((await storage.list_batches(owner="alice")).items) == 3
    assert len(await factories.all_requests(storage, first.id)) == 3


async def test_deleting_a_batch_frees_its_idempotency_key(storage: base.Storage) -> None:
    file = await factories.upload(storage)
    first = await factories.create_batch(storage, file=file, idempotency_key="k1")
    await storage.delete_batch(first.id, owner="alice")
    again = await factories.create_batch(storage, file=file, idempotency_key="k1")
    assert again.id != first.id
    assert (await storage.get_batch(again.id, owner="alice")).counts.total == 3
    with pytest.raises(errors.NotFound):
        await storage.get_batch(first.id, owner="alice")


async def test_concurrent_creates_with_one_key_make_one_batch(
    backend: backends.Backend, storage: base.Storage, clock: clocks.ManualClock
) -> None:
    file = await factories.upload(storage, count=50)
    stores = [storage, *[await backend.open_store(clock) for _ in range(3)]]
    spec = models.BatchSpec(owner="alice", input_file_id=file.id, endpoint=factories.CHAT, idempotency_key="same")
    created = await asyncio.gather(*(stores[index % 4].create_batch(spec) for index in range(8)))
    assert len({batch.id for batch in created}) == 1
    listed = await storage.list_batches(owner="alice")
    assert [batch.id for batch in listed.items] == [created[0].id]
    assert listed.items[0].counts.total == 50
    assert len(await factories.all_requests(storage, created[0].id)) == 50
    await factories.run_to_completion(storage, created[0])  # claims every pending request: only this batch's
    output_files = await storage.list_files(owner="alice", purpose=states.FilePurpose.BATCH_OUTPUT)
    assert len(output_files.items) == 1


async def test_get_batch_is_scoped_to_the_owner(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.get_batch(batch.id, owner="bob")
    with pytest.raises(errors.NotFound):
        await storage.get_batch(ids.new_batch_id(), owner=models.ALL_OWNERS)
    assert (await storage.get_batch(batch.id, owner=models.ALL_OWNERS)).id == batch.id


async def test_list_batches_newest_first_with_cursor(storage: base.Storage, clock: clocks.ManualClock) -> None:
    made = []
    for _ in range(5):
        made.append(await factories.create_batch(storage, count=2))
        clock.advance(SECOND)
    await factories.create_batch(storage, owner="bob")
    seen: list[ids.BatchId] = []
    flags: list[bool] = []
    after: ids.BatchId | None = None
    while True:
        page = await storage.list_batches(owner="alice", after=after, limit=2)
        seen.extend(batch.id for batch in page.items)
        flags.append(page.has_more)
        if not page.has_more:
            break
        after = page.items[-1].id
    assert seen == [batch.id for batch in made[::-1]]
    assert flags == [True, True, False]
    assert all(batch.counts.total == 2 for batch in (await storage.list_batches(owner="alice")).items)
    assert len((await storage.list_batches(owner=models.ALL_OWNERS)).items) == 6
    assert len((await storage.list_batches(owner="bob")).items) == 1


async def test_list_batches_defaults_to_twenty_and_breaks_ties_by_id(storage: base.Storage) -> None:
    file = await factories.upload(storage, count=1)
    made = [await factories.create_batch(storage, file=file) for _ in range(21)]
    page = await storage.list_batches(owner="alice")
    assert len(page.items) == 20
    assert page.has_more is True
    assert [batch.id for batch in page.items] == sorted((batch.id for batch in made), reverse=True)[:20]


async def test_list_batches_rejects_a_bad_cursor(storage: base.Storage) -> None:
    theirs = await factories.create_batch(storage, owner="bob")
    for cursor in (theirs.id, ids.new_batch_id()):
        with pytest.raises(errors.NotFound):
            await storage.list_batches(owner="alice", after=cursor)


async def test_list_requests_in_line_order_with_filter_and_cursor(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=6)
    daemon = await factories.register(storage)
    claimed = await factories.claim(storage, daemon, 2)
    requests = await factories.all_requests(storage, batch.id)
    assert [request.line_number for request in requests] == [1, 2, 3, 4, 5, 6]
    assert {item.id for item in claimed} == {requests[0].id, requests[1].id}
    first = await storage.list_requests(batch.id, owner="alice", limit=4)
    assert [request.line_number for request in first.items] == [1, 2, 3, 4]
    assert first.has_more is True
    rest = await storage.list_requests(batch.id, owner="alice", after=first.items[-1].id, limit=4)
    assert [request.line_number for request in rest.items] == [5, 6]
    assert rest.has_more is False
    pending = await storage.list_requests(batch.id, owner="alice", state=states.RequestState.PENDING, limit=2)
    assert [request.line_number for request in pending.items] == [3, 4]
    assert pending.has_more is True
    claimed_page = await storage.list_requests(batch.id, owner="alice", state=states.RequestState.CLAIMED)
    assert [request.line_number for request in claimed_page.items] == [1, 2]
    assert all(request.daemon_id == daemon for request in claimed_page.items)


async def test_list_requests_defaults_to_one_hundred(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=101)
    page = await storage.list_requests(batch.id, owner="alice")
    assert len(page.items) == 100
    assert page.has_more is True


async def test_list_requests_scoping_and_cursor_errors(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, owner="alice")
    other = await factories.create_batch(storage, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.list_requests(batch.id, owner="bob")
    with pytest.raises(errors.NotFound):
        await storage.list_requests(ids.new_batch_id(), owner=models.ALL_OWNERS)
    foreign = (await factories.all_requests(storage, other.id))[0].id
    for cursor in (foreign, ids.new_request_id()):
        with pytest.raises(errors.NotFound):
            await storage.list_requests(batch.id, owner="alice", after=cursor)


async def test_deleted_batch_is_gone(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage)
    kept = await factories.create_batch(storage)
    with pytest.raises(errors.NotFound):
        await storage.delete_batch(batch.id, owner="bob")
    await storage.delete_batch(batch.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.get_batch(batch.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.cancel_batch(batch.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.retry_failed(batch.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.list_requests(batch.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.delete_batch(batch.id, owner="alice")
    for file_id in (batch.output_file_id, batch.error_file_id):
        with pytest.raises(errors.NotFound):
            await storage.get_file(file_id, owner="alice")
    assert [item.id for item in (await storage.list_batches(owner=models.ALL_OWNERS)).items] == [kept.id]
    # The input file is not deleted with the batch.
    assert (await storage.get_file(batch.input_file_id, owner="alice")).id == batch.input_file_id
    # The deleted batch's requests are not claimed.
    daemon = await factories.register(storage)
    assert {item.batch_id for item in await factories.claim(storage, daemon)} == {kept.id}


async def test_deleting_a_running_batch_cancels_it(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=4)
    daemon = await factories.register(storage)
    claimed = [item.id for item in await factories.claim(storage, daemon, 2)]
    await factories.start(storage, daemon, claimed[:1])
    assert await storage.cancelling_requests(daemon) == []
    await storage.delete_batch(batch.id, owner="alice")
    assert sorted(await storage.cancelling_requests(daemon)) == sorted(claimed)
    assert await factories.claim(storage, daemon) == []
    report = await storage.apply_writes(daemon, [models.Cancel(request_id) for request_id in claimed])
    assert report.applied == frozenset(claimed)
    assert await storage.cancelling_requests(daemon) == []
    # A deleted batch is not finalized (it stays invisible until purged).
    assert await storage.finalize_batches() == []


async def test_missing_objects_are_refused_in_the_same_words_on_every_backend(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=1)
    file_id, batch_id, request_id = ids.new_file_id(), ids.new_batch_id(), ids.new_request_id()
    daemon_id, key_id = ids.new_daemon_id(), ids.new_api_key_id()
    with pytest.raises(errors.NotFound) as missing_file:
        await storage.get_file(file_id, owner=models.ALL_OWNERS)
    assert str(missing_file.value) == f"No file with id {ids.file_wire(file_id)}."
    with pytest.raises(errors.NotFound) as missing_batch:
        await storage.get_batch(batch_id, owner=models.ALL_OWNERS)
    assert str(missing_batch.value) == f"No batch with id {ids.batch_wire(batch_id)}."
    with pytest.raises(errors.NotFound) as missing_request:
        await storage.list_requests(batch.id, owner=models.ALL_OWNERS, after=request_id)
    wire = ids.request_wire(request_id)
    assert str(missing_request.value) == f"No request with id {wire} in batch {ids.batch_wire(batch.id)}."
    with pytest.raises(errors.NotFound) as missing_daemon:
        await storage.heartbeat(daemon_id)
    assert str(missing_daemon.value) == f"No daemon with id {daemon_id}."
    with pytest.raises(errors.NotFound) as missing_key:
        await storage.revoke_api_key(key_id)
    assert str(missing_key.value) == f"No API key with id {key_id}."
