"""RetentionStore.purge_deleted: bounded hard deletes of soft-deleted batches and files, never of live data."""

from __future__ import annotations

import orjson

from fusillade.domain import models, states
from fusillade.storage import base
from tests.support import factories


async def purge_everything(storage: base.Storage, limit: int) -> int:
    """Call `purge_deleted(limit)` until it returns 0; each call deletes at most `limit`. Returns the total."""
    total = 0
    for _ in range(1000):
        deleted = await storage.purge_deleted(limit=limit)
        assert 0 <= deleted <= limit
        if deleted == 0:
            return total
        total += deleted
    raise AssertionError("purge_deleted never reported that nothing was left")


async def test_purge_removes_deleted_batches_and_files_in_bounded_chunks(storage: base.Storage) -> None:
    gone = await factories.create_batch(storage, count=10)
    await factories.run_to_completion(storage, gone, failing=3)
    assert await storage.finalize_batches() == [gone.id]
    await storage.delete_batch(gone.id, owner="alice")
    await storage.delete_file(gone.input_file_id, owner="alice")

    live = await factories.create_batch(storage, count=3, prefix="live")
    spare = await factories.upload(storage, count=2, prefix="spare")

    # 10 requests, the batch, its 2 result files, 10 templates and the input file.
    assert await purge_everything(storage, limit=4) == 24
    assert await storage.purge_deleted() == 0

    assert [batch.id for batch in (await storage.list_batches(owner=models.ALL_OWNERS)).items] == [live.id]
    assert (await storage.get_batch(live.id, owner="alice")).counts == models.RequestCounts(total=3, pending=3)
    remaining = {file.id for file in (await storage.list_files(owner=models.ALL_OWNERS)).items}
    assert remaining == {live.input_file_id, spare.id}  # the live batch's result files have no line yet
    assert len(await factories.read_lines(storage, spare.id)) == 2
    daemon = await factories.register(storage, "after-purge")
    claimed = await factories.claim(storage, daemon)
    assert sorted(item.custom_id for item in claimed) == ["live-1", "live-2", "live-3"]


async def test_purge_keeps_templates_that_an_unfinished_batch_needs(storage: base.Storage) -> None:
    file = await factories.upload(storage, count=4)
    batch = await factories.create_batch(storage, file=file)
    await storage.delete_file(file.id, owner="alice")
    assert await purge_everything(storage, limit=3) == 0

    daemon = await factories.register(storage)
    claimed = await factories.claim(storage, daemon)
    assert len(claimed) == 4
    assert all(orjson.loads(item.body)["model"] == factories.MODEL for item in claimed)
    await factories.complete(storage, daemon, [item.id for item in claimed])
    assert await storage.finalize_batches() == [batch.id]

    # The batch is finished but live: a retry may still need the templates, so they stay.
    assert await purge_everything(storage, limit=3) == 0
    failed_later = claimed[0].id
    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 0
    done = await storage.get_batch(batch.id, owner="alice")
    assert done.status is states.BatchStatus.COMPLETED
    assert len(await factories.read_lines(storage, batch.output_file_id)) == 4

    # Once the batch is deleted too, its rows, then the file's 4 templates and its row go.
    await storage.delete_batch(batch.id, owner="alice")
    # 4 requests + batch + 2 result files + 4 templates + the input file.
    assert await purge_everything(storage, limit=3) == 12
    assert failed_later not in {item.id for item in await factories.claim(storage, daemon)}


async def test_purge_keeps_templates_a_finished_batch_may_retry_from(storage: base.Storage) -> None:
    file = await factories.upload(storage, count=2)
    batch = await factories.create_batch(storage, file=file)
    daemon = await factories.register(storage)
    claimed = await factories.claim(storage, daemon)
    await factories.start(storage, daemon, [item.id for item in claimed])
    await factories.apply(storage, daemon, *(models.Fail(request_id=item.id, code="timeout") for item in claimed))
    assert await storage.finalize_batches() == [batch.id]
    await storage.delete_file(file.id, owner="alice")
    assert await purge_everything(storage, limit=10) == 0

    assert (await storage.retry_failed(batch.id, owner="alice")).moved == 2
    again = await factories.claim(storage, daemon)
    assert sorted(item.custom_id for item in again) == ["req-1", "req-2"]
    assert all(orjson.loads(item.body)["model"] == factories.MODEL for item in again)


async def test_purge_of_a_deleted_batch_keeps_its_live_input_file(storage: base.Storage) -> None:
    file = await factories.upload(storage, count=3)
    batch = await factories.create_batch(storage, file=file)
    await storage.delete_batch(batch.id, owner="alice")
    # 3 requests, the batch and its 2 result files.
    assert await purge_everything(storage, limit=2) == 6
    assert len(await factories.read_lines(storage, file.id)) == 3
    again = await factories.create_batch(storage, file=file)
    assert again.counts.total == 3


async def test_purge_with_nothing_deleted_does_nothing(storage: base.Storage) -> None:
    batch = await factories.create_batch(storage, count=2)
    assert await storage.purge_deleted(limit=10) == 0
    assert len(await factories.all_requests(storage, batch.id)) == 2
