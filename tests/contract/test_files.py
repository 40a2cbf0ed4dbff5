"""FileStore: uploads, listings, soft delete, owner scoping and input file content."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import orjson
import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, models, states
from fusillade.storage import base
from tests.support import factories

SECOND = timedelta(seconds=1)


async def test_create_file_returns_the_stored_file(storage: base.Storage, clock: clocks.ManualClock) -> None:
    items = factories.templates(4)
    expires = clock.now() + timedelta(days=30)
    created = await storage.create_file(
        owner="alice", filename="in.jsonl", templates=items, size_bytes=1234, expires_at=expires
    )
    assert created.owner == "alice"
    assert created.filename == "in.jsonl"
    assert created.purpose is states.FilePurpose.BATCH
    assert created.bytes == 1234
    assert created.request_count == 4
    assert created.created_at == clock.now()
    assert created.expires_at == expires
    assert created.batch_id is None
    clock.advance(SECOND)
    assert await storage.get_file(created.id, owner="alice") == created
    assert await storage.get_file(created.id, owner=models.ALL_OWNERS) == created


async def test_create_file_accepts_an_async_iterable(storage: base.Storage) -> None:
    items = factories.templates(3)

    async def stream() -> AsyncIterator[models.TemplateInput]:
        for item in items:
            yield item

    created = await storage.create_file(owner="alice", filename="a.jsonl", templates=stream(), size_bytes=10)
    assert created.request_count == 3
    assert created.expires_at is None
    lines = await factories.read_lines(storage, created.id)
    assert [line["custom_id"] for line in lines] == ["req-1", "req-2", "req-3"]


async def test_input_content_round_trips(storage: base.Storage) -> None:
    items = factories.templates(3, custom_ids=["a", 'quote " and \\ slash', "ünïcødé ✓"])
    items.append(
        models.TemplateInput(
            line_number=4,
            custom_id="emb",
            method="POST",
            url="/v1/embeddings",
            model="embedder",
            body='{"model":"embedder","input":["x","y"],"nested":{"k":[1,2.5,null,true]}}',
        )
    )
    created = await factories.upload(storage, items=items)
    content = await factories.read_content(storage, created.id, owner="alice")
    assert content.endswith(b"\n")
    lines = [orjson.loads(line) for line in content.splitlines()]
    assert len(lines) == len(items)
    for line, item in zip(lines, items, strict=True):
        assert set(line) == {"custom_id", "method", "url", "body"}
        assert line["custom_id"] == item.custom_id
        assert line["method"] == item.method
        assert line["url"] == item.url
        assert line["body"] == orjson.loads(item.body)


async def test_large_input_streams_in_several_chunks(storage: base.Storage) -> None:
    items = factories.templates(5000)
    created = await factories.upload(storage, items=items)
    assert created.request_count == 5000
    chunks = await factories.read_chunks(storage, created.id)
    assert len(chunks) >= 2, "5,000 lines must be read in pages, not in one piece"
    lines = b"".join(chunks).splitlines()
    assert len(lines) == 5000
    assert [orjson.loads(line)["custom_id"] for line in lines] == [item.custom_id for item in items]


async def test_empty_file_is_rejected_and_nothing_is_stored(storage: base.Storage) -> None:
    with pytest.raises(errors.ValidationError) as caught:
        await storage.create_file(owner="alice", filename="empty.jsonl", templates=[], size_bytes=0)
    # The same words on every backend (storage.refusals).
    assert caught.value.message == "The file is empty: upload at least one request line."
    assert [(error.line, error.reason) for error in caught.value.errors] == [(0, "The file has no request lines.")]
    page = await storage.list_files(owner=models.ALL_OWNERS)
    assert list(page.items) == []


class Boom(Exception):
    pass


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_failing_iterable_rolls_back_and_reraises(storage: base.Storage, asynchronous: bool) -> None:
    # More than one insert chunk before the failure, so a partial commit would show.
    items = factories.templates(6000)
    boom = Boom("line 6001 is bad")

    def sync_stream() -> Iterator[models.TemplateInput]:
        yield from items
        raise boom

    async def async_stream() -> AsyncIterator[models.TemplateInput]:
        for item in items:
            yield item
        raise boom

    source = async_stream() if asynchronous else sync_stream()
    with pytest.raises(Boom) as caught:
        await storage.create_file(owner="alice", filename="bad.jsonl", templates=source, size_bytes=99)
    assert caught.value is boom
    assert list((await storage.list_files(owner=models.ALL_OWNERS)).items) == []
    # The store is still usable afterwards (the failed transaction was cleaned up).
    created = await factories.upload(storage, count=2)
    assert [item.id for item in (await storage.list_files(owner=models.ALL_OWNERS)).items] == [created.id]


async def test_validated_upload_with_bad_lines_is_rejected_with_line_numbers(storage: base.Storage) -> None:
    from fusillade.domain import jsonl

    good = factories.jsonl(factories.templates(5)).splitlines(keepends=True)
    good[1] = b"{not json\n"
    good[3] = b'{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n'
    data = b"".join(good)
    with pytest.raises(errors.ValidationError) as caught:
        await storage.create_file(
            owner="alice",
            filename="bad.jsonl",
            templates=jsonl.validate(jsonl.iterate_chunks(data, chunk_size=64)),
            size_bytes=len(data),
        )
    assert [error.line for error in caught.value.errors] == [2, 4]
    assert list((await storage.list_files(owner=models.ALL_OWNERS)).items) == []


async def test_validated_upload_of_good_lines_is_stored(storage: base.Storage) -> None:
    from fusillade.domain import jsonl

    data = factories.jsonl(factories.templates(3))
    created = await storage.create_file(
        owner="alice",
        filename="good.jsonl",
        templates=jsonl.validate(jsonl.iterate_chunks(data, chunk_size=50)),
        size_bytes=len(data),
    )
    assert created.request_count == 3
    assert created.bytes == len(data)
    stored = [orjson.loads(line) for line in (await factories.read_content(storage, created.id)).splitlines()]
    assert stored == [orjson.loads(line) for line in data.splitlines()]


async def _upload_series(storage: base.Storage, clock: clocks.ManualClock, count: int) -> list[models.File]:
    made = []
    for index in range(count):
        made.append(await factories.upload(storage, filename=f"f{index}.jsonl", count=1))
        clock.advance(SECOND)
    return made


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_list_files_pages_with_cursor(
    storage: base.Storage, clock: clocks.ManualClock, order: base.SortOrder
) -> None:
    made = await _upload_series(storage, clock, 5)
    expected = [item.id for item in (made if order == "asc" else made[::-1])]
    seen: list[ids.FileId] = []
    after: ids.FileId | None = None
    pages = []
    while True:
        page = await storage.list_files(owner="alice", after=after, limit=2, order=order)
        pages.append((len(page.items), page.has_more))
        seen.extend(item.id for item in page.items)
        if not page.has_more:
            break
        after = page.items[-1].id
    assert seen == expected
    assert pages == [(2, True), (2, True), (1, False)]


async def test_list_files_default_order_is_newest_first(storage: base.Storage, clock: clocks.ManualClock) -> None:
    made = await _upload_series(storage, clock, 3)
    page = await storage.list_files(owner="alice")
    assert [item.id for item in page.items] == [item.id for item in made[::-1]]
    assert page.has_more is False


async def test_list_files_breaks_time_ties_by_id(storage: base.Storage) -> None:
    made = [await factories.upload(storage, count=1) for _ in range(4)]
    by_id = sorted(item.id for item in made)
    assert [item.id for item in (await storage.list_files(owner="alice", order="asc")).items] == by_id
    assert [item.id for item in (await storage.list_files(owner="alice", order="desc")).items] == by_id[::-1]


async def test_list_files_is_scoped_to_the_owner(storage: base.Storage, clock: clocks.ManualClock) -> None:
    alice = await factories.upload(storage, owner="alice")
    clock.advance(SECOND)
    bob = await factories.upload(storage, owner="bob")
    assert [item.id for item in (await storage.list_files(owner="alice")).items] == [alice.id]
    assert [item.id for item in (await storage.list_files(owner="bob")).items] == [bob.id]
    assert [item.id for item in (await storage.list_files(owner="carol")).items] == []
    everyone = await storage.list_files(owner=models.ALL_OWNERS, order="asc")
    assert [item.id for item in everyone.items] == [alice.id, bob.id]


async def test_list_files_filters_by_purpose(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=2)
    await factories.run_to_completion(storage, batch, failing=1)  # both result files have a line
    inputs = await storage.list_files(owner="alice", purpose=states.FilePurpose.BATCH)
    assert [item.id for item in inputs.items] == [batch.input_file_id]
    outputs = await storage.list_files(owner="alice", purpose=states.FilePurpose.BATCH_OUTPUT)
    assert [item.id for item in outputs.items] == [batch.output_file_id]
    failures = await storage.list_files(owner="alice", purpose=states.FilePurpose.BATCH_ERROR)
    assert [item.id for item in failures.items] == [batch.error_file_id]
    every = await storage.list_files(owner="alice")
    assert {item.id for item in every.items} == {batch.input_file_id, batch.output_file_id, batch.error_file_id}


async def test_list_files_rejects_a_bad_cursor(storage: base.Storage) -> None:
    mine = await factories.upload(storage, owner="alice")
    theirs = await factories.upload(storage, owner="bob")
    gone = await factories.upload(storage, owner="alice")
    await storage.delete_file(gone.id, owner="alice")
    for cursor in (theirs.id, gone.id, ids.new_file_id()):
        with pytest.raises(errors.NotFound):
            await storage.list_files(owner="alice", after=cursor)
    assert list((await storage.list_files(owner="alice", after=mine.id)).items) == []


async def test_deleted_file_is_gone(storage: base.Storage) -> None:
    kept = await factories.upload(storage)
    gone = await factories.upload(storage)
    await storage.delete_file(gone.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.get_file(gone.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.get_file(gone.id, owner=models.ALL_OWNERS)
    with pytest.raises(errors.NotFound):
        await storage.open_file_content(gone.id, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.delete_file(gone.id, owner="alice")
    assert [item.id for item in (await storage.list_files(owner=models.ALL_OWNERS)).items] == [kept.id]


async def test_another_owners_file_is_not_found(storage: base.Storage) -> None:
    file = await factories.upload(storage, owner="alice")
    with pytest.raises(errors.NotFound):
        await storage.get_file(file.id, owner="bob")
    with pytest.raises(errors.NotFound):
        await storage.open_file_content(file.id, owner="bob")
    with pytest.raises(errors.NotFound):
        await storage.delete_file(file.id, owner="bob")
    assert (await storage.get_file(file.id, owner="alice")).id == file.id
    await storage.delete_file(file.id, owner=models.ALL_OWNERS)
    with pytest.raises(errors.NotFound):
        await storage.get_file(file.id, owner="alice")


async def test_unknown_file_is_not_found(storage: base.Storage) -> None:
    unknown = ids.new_file_id()
    with pytest.raises(errors.NotFound):
        await storage.get_file(unknown, owner=models.ALL_OWNERS)
    with pytest.raises(errors.NotFound):
        await storage.open_file_content(unknown, owner=models.ALL_OWNERS)
    with pytest.raises(errors.NotFound):
        await storage.delete_file(unknown, owner=models.ALL_OWNERS)


async def test_deleting_an_input_file_keeps_its_batch_running(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    await storage.delete_file(batch.input_file_id, owner="alice")
    daemon = await factories.register(storage)
    claimed = await factories.claim(storage, daemon)
    assert sorted(item.custom_id for item in claimed) == ["req-1", "req-2"]
    assert all(orjson.loads(item.body)["model"] == factories.MODEL for item in claimed)
    assert (await storage.get_batch(batch.id, owner="alice")).counts.in_progress == 2
