"""Output and error files: every terminal request exactly once, in completion order, with exact sizes, also while
the batch is still running."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import ids, lines, models, states
from fusillade.storage import base
from tests.support import factories

SECOND = timedelta(seconds=1)
State = states.RequestState


async def check_result_files(storage: base.Storage, batch: models.Batch) -> tuple[bytes, bytes]:
    """The output and error files hold exactly the batch's terminal requests, each rendered once by
    `lines.result_line`, ordered by (finished_at, id); `bytes` and `request_count` match the content. A file
    that would be empty is neither found nor listed."""
    requests = await factories.all_requests(storage, batch.id)

    def completion_order(wanted: set[State]) -> list[models.Request]:
        chosen = [request for request in requests if request.state in wanted]
        return sorted(chosen, key=lambda request: (request.finished_at, request.id))

    contents = []
    for file_id, wanted in (
        (batch.output_file_id, {State.COMPLETED}),
        (batch.error_file_id, {State.FAILED, State.CANCELED}),
    ):
        expected = completion_order(wanted)
        if not expected:  # a result file without lines does not exist yet, as on OpenAI
            with pytest.raises(errors.NotFound):
                await storage.get_file(file_id, owner=batch.owner)
            listed = await storage.list_files(owner=batch.owner)
            assert file_id not in {file.id for file in listed.items}
            contents.append(b"")
            continue
        content = await factories.read_content(storage, file_id, owner=batch.owner)
        assert content == b"".join(lines.result_line(request) for request in expected)
        file = await storage.get_file(file_id, owner=batch.owner)
        assert file.bytes == len(content)
        assert file.request_count == len(expected) == content.count(b"\n")
        contents.append(content)
    return contents[0], contents[1]


async def test_results_of_a_mixed_batch(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=9, window="1h")
    daemon = await factories.register(storage)
    requests = await factories.all_requests(storage, batch.id)
    r = [request.id for request in requests]
    assert {item.id for item in await factories.claim(storage, daemon, 8)} == set(r[:8])
    await factories.start(storage, daemon, r[:8])
    assert await check_result_files(storage, batch) == (b"", b"")

    writes: list[models.RequestWrite] = [
        models.Complete(r[0], 200, '{"answer":1}'),
        models.Fail(request_id=r[1], status_code=500, body='{"error":{"message":"boom"}}'),
        models.Fail(request_id=r[2], code="timeout", message="no answer in 30s"),
        models.Complete(r[3], 200, '{"answer":"ü✓"}'),
        models.Fail(request_id=r[4], status_code=429, body=None),
        models.Cancel(r[5]),
        models.Fail(request_id=r[6]),
    ]
    for write in writes:
        clock.advance(SECOND)
        await factories.apply(storage, daemon, write)
        await check_result_files(storage, batch)

    clock.advance(timedelta(hours=1))
    assert await storage.expire_batches() == [batch.id]
    output, errors_content = await check_result_files(storage, batch)

    wire = [ids.request_wire(request_id) for request_id in r]
    output_lines = [orjson.loads(line) for line in output.splitlines()]
    error_lines = [orjson.loads(line) for line in errors_content.splitlines()]
    assert sorted(line["id"] for line in output_lines + error_lines) == sorted(wire)
    assert [line["custom_id"] for line in output_lines] == ["req-1", "req-4"]
    assert [line["custom_id"] for line in error_lines[:5]] == ["req-2", "req-3", "req-5", "req-6", "req-7"]
    assert {line["custom_id"] for line in error_lines[5:]} == {"req-8", "req-9"}

    assert output_lines[0] == {
        "id": wire[0],
        "custom_id": "req-1",
        "response": {"status_code": 200, "request_id": None, "body": {"answer": 1}},
        "error": None,
    }
    assert output_lines[1]["response"]["body"] == {"answer": "ü✓"}
    http_error, timeout, no_body, cancelled, bare, *expired = error_lines
    assert http_error["response"] == {
        "status_code": 500,
        "request_id": None,
        "body": {"error": {"message": "boom"}},
    }
    assert http_error["error"] is None
    assert timeout["response"] is None
    assert timeout["error"] == {"code": "timeout", "message": "no answer in 30s"}
    assert no_body["response"] == {"status_code": 429, "request_id": None, "body": None}
    assert cancelled["error"] == {
        "code": lines.BATCH_CANCELLED,
        "message": lines.default_message(lines.BATCH_CANCELLED),
    }
    assert bare["error"] == {"code": "error", "message": lines.default_message("error")}
    for line in expired:
        assert line["response"] is None
        assert line["error"] == {
            "code": lines.BATCH_EXPIRED,
            "message": lines.default_message(lines.BATCH_EXPIRED),
        }

    stored = {request.id: request for request in await factories.all_requests(storage, batch.id)}
    assert stored[r[1]].response_status == 500 and stored[r[1]].error_code is None
    assert stored[r[2]].error_code == "timeout" and stored[r[2]].response_status is None
    assert stored[r[4]].response_status == 429 and stored[r[4]].response_body is None
    assert stored[r[6]].error_code == "error"
    assert stored[r[0]].daemon_id == daemon, "a terminal row keeps the daemon that finished it"


async def test_results_of_a_cancelled_batch(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=4)
    daemon = await factories.register(storage)
    first, second = (item.id for item in await factories.claim(storage, daemon, 2))
    await factories.complete(storage, daemon, [first])
    clock.advance(SECOND)
    await storage.cancel_batch(batch.id, owner="alice")
    await check_result_files(storage, batch)
    clock.advance(SECOND)
    await factories.apply(storage, daemon, models.Cancel(second))
    await storage.finalize_batches()
    output, errors_content = await check_result_files(storage, batch)
    assert output.count(b"\n") == 1
    assert [orjson.loads(line)["error"]["code"] for line in errors_content.splitlines()] == [
        lines.BATCH_CANCELLED
    ] * 3


async def test_result_sizes_are_exact_for_unicode(storage: base.Storage, clock: clocks.ManualClock) -> None:
    custom_ids = ['ü "quoted" ✓', "tab\there", "\\back\\slash", "emoji 🎯"]
    batch = await factories.create_batch(
        storage, file=await factories.upload(storage, items=factories.templates(custom_ids=custom_ids))
    )
    daemon = await factories.register(storage)
    r = [request.id for request in await factories.all_requests(storage, batch.id)]
    await factories.claim(storage, daemon)
    await factories.start(storage, daemon, r)
    await factories.apply(storage, daemon, models.Complete(r[0], 200, '{"text":"héllo ✓ 🎯"}'))
    clock.advance(SECOND)
    await factories.apply(storage, daemon, models.Fail(request_id=r[1], status_code=400, body='"plain ✓ text"'))
    clock.advance(SECOND)
    await factories.apply(
        storage, daemon, models.Fail(request_id=r[2], code="upstream_error", message="ünexpected")
    )
    clock.advance(SECOND)
    await factories.apply(storage, daemon, models.Fail(request_id=r[3], code="connection_error"))
    output, errors_content = await check_result_files(storage, batch)
    parsed = [orjson.loads(line) for line in (output + errors_content).splitlines()]
    assert [line["custom_id"] for line in parsed] == custom_ids
    assert parsed[3]["error"] == {"code": "connection_error", "message": lines.default_message("connection_error")}


async def test_large_output_streams_in_pages(storage: base.Storage, clock: clocks.ManualClock) -> None:
    batch = await factories.create_batch(storage, count=2100)
    daemon = await factories.register(storage)
    claimed = [item.id for item in await factories.claim(storage, daemon, 5000)]
    assert len(claimed) == 2100
    await factories.start(storage, daemon, claimed)
    half = len(claimed) // 2
    await factories.apply(storage, daemon, *(models.Complete(i, 200, '{"ok":true}') for i in claimed[:half]))
    clock.advance(SECOND)
    await factories.apply(storage, daemon, *(models.Complete(i, 200, '{"ok":true}') for i in claimed[half:]))
    chunks = await factories.read_chunks(storage, batch.output_file_id)
    assert len(chunks) >= 2, "2,100 lines must be read in pages, not in one piece"
    await check_result_files(storage, batch)
