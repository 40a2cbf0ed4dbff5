"""Builders for test data on any `Storage`: templates, uploaded files, batches, daemons, and readers for
requests and file content."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orjson

from fusillade import errors
from fusillade.domain import ids, models, states
from fusillade.domain.usage import Usage
from fusillade.storage import base

OWNER = "alice"
CHAT = "/v1/chat/completions"
MODEL = "model-a"


def templates(
    count: int = 3,
    *,
    model: str = MODEL,
    models_by_line: Sequence[str] | None = None,
    custom_ids: Sequence[str] | None = None,
    url: str = CHAT,
    urls_by_line: dict[int, str] | None = None,
    prefix: str = "req",
) -> list[models.TemplateInput]:
    """`count` chat templates numbered from line 1; `models_by_line` and `custom_ids` override per line,
    `urls_by_line` maps a line number to another url."""
    if models_by_line is not None:
        count = len(models_by_line)
    if custom_ids is not None:
        count = len(custom_ids)
    result = []
    for index in range(count):
        line = index + 1
        line_model = models_by_line[index] if models_by_line is not None else model
        body = {"model": line_model, "messages": [{"role": "user", "content": f"hello {line}"}], "n": line}
        result.append(
            models.TemplateInput(
                line_number=line,
                custom_id=custom_ids[index] if custom_ids is not None else f"{prefix}-{line}",
                method="POST",
                url=(urls_by_line or {}).get(line, url),
                model=line_model,
                body=orjson.dumps(body).decode(),
            )
        )
    return result


def jsonl(items: Sequence[models.TemplateInput]) -> bytes:
    """The JSONL file these templates came from."""
    return b"".join(
        orjson.dumps(
            {"custom_id": item.custom_id, "method": item.method, "url": item.url, "body": orjson.loads(item.body)}
        )
        + b"\n"
        for item in items
    )


async def upload(
    store: base.FileStore,
    *,
    owner: str = OWNER,
    count: int = 3,
    items: Sequence[models.TemplateInput] | None = None,
    filename: str = "input.jsonl",
    **template_options: Any,
) -> models.File:
    """Store an input file of `items` (default: `templates(count, **template_options)`)."""
    chosen = list(items) if items is not None else templates(count, **template_options)
    return await store.create_file(owner=owner, filename=filename, templates=chosen, size_bytes=len(jsonl(chosen)))


async def create_batch(
    store: base.Storage,
    *,
    owner: str = OWNER,
    count: int = 3,
    window: str = "24h",
    file: models.File | None = None,
    endpoint: str = CHAT,
    metadata: dict[str, str] | None = None,
    idempotency_key: str | None = None,
    **template_options: Any,
) -> models.Batch:
    """A batch over `file`, or over a new upload of `count` templates."""
    if file is None:
        file = await upload(store, owner=owner, count=count, **template_options)
    return await store.create_batch(
        models.BatchSpec(
            owner=owner,
            input_file_id=file.id,
            endpoint=endpoint,
            completion_window=window,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
    )


async def register(store: base.DaemonRegistry, hostname: str = "host-1") -> ids.DaemonId:
    daemon = await store.register_daemon(
        models.DaemonInfo(hostname=hostname, pid=os.getpid(), version="test", config={"concurrency": 4})
    )
    return daemon.id


async def claim(
    store: base.RequestQueue,
    daemon_id: ids.DaemonId,
    count: int = 1000,
    *,
    model: str = MODEL,
    limit: int | None = None,
    owner_in_flight: dict[str, int] | None = None,
) -> list[models.ClaimedRequest]:
    """Claim up to `count` requests of one model."""
    return await store.claim_requests(
        daemon_id,
        [models.ModelCapacity(model=model, free=count, limit=limit)],
        limit=count,
        owner_in_flight=owner_in_flight,
    )


async def apply(
    store: base.RequestQueue, daemon_id: ids.DaemonId, *writes: models.RequestWrite
) -> models.WriteReport:
    """Apply writes and insist that each one applied."""
    report = await store.apply_writes(daemon_id, list(writes))
    assert report.conflicts == {} and report.missing == frozenset(), report
    return report


async def all_requests(
    store: base.BatchStore,
    batch_id: ids.BatchId,
    *,
    owner: models.OwnerScope = models.ALL_OWNERS,
    state: states.RequestState | None = None,
) -> list[models.Request]:
    """Every request of a batch in line order, following the cursor."""
    found: list[models.Request] = []
    after: ids.RequestId | None = None
    while True:
        page = await store.list_requests(batch_id, owner=owner, state=state, after=after, limit=500)
        found.extend(page.items)
        if not page.has_more:
            return found
        after = page.items[-1].id


async def read_chunks(
    store: base.FileStore, file_id: ids.FileId, *, owner: models.OwnerScope = models.ALL_OWNERS
) -> list[bytes]:
    stream = await store.open_file_content(file_id, owner=owner)
    return [chunk async for chunk in stream]


async def read_content(
    store: base.FileStore, file_id: ids.FileId, *, owner: models.OwnerScope = models.ALL_OWNERS
) -> bytes:
    return b"".join(await read_chunks(store, file_id, owner=owner))


async def read_lines(
    store: base.FileStore, file_id: ids.FileId, *, owner: models.OwnerScope = models.ALL_OWNERS
) -> list[dict[str, Any]]:
    """The file's JSONL content, one parsed object per line."""
    content = await read_content(store, file_id, owner=owner)
    assert content == b"" or content.endswith(b"\n"), content[-200:]
    return [orjson.loads(line) for line in content.splitlines()]


async def result_file_lines(store: base.FileStore, file_id: ids.FileId) -> list[dict[str, Any]]:
    """The lines of a batch's output or error file; none when the file does not exist: it appears with its
    first line, as on OpenAI."""
    try:
        return await read_lines(store, file_id)
    except errors.NotFound:
        return []


async def result_lines(
    store: base.FileStore, batch: models.Batch
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The lines of the batch's output file and of its error file."""
    return await result_file_lines(store, batch.output_file_id), await result_file_lines(
        store, batch.error_file_id
    )


def response_body(request_id: ids.RequestId) -> str:
    """A distinct upstream body per request."""
    return orjson.dumps({"id": f"chatcmpl-{request_id.hex[:8]}", "choices": [{"text": "hi"}]}).decode()


async def start(store: base.RequestQueue, daemon_id: ids.DaemonId, request_ids: Sequence[ids.RequestId]) -> None:
    """claimed -> processing."""
    if request_ids:
        await apply(store, daemon_id, *(models.MarkProcessing(request_id) for request_id in request_ids))


async def complete(
    store: base.RequestQueue,
    daemon_id: ids.DaemonId,
    request_ids: Sequence[ids.RequestId],
    *,
    status_code: int = 200,
) -> None:
    """claimed -> processing -> completed, each with `response_body(id)`."""
    await start(store, daemon_id, request_ids)
    if request_ids:
        await apply(
            store,
            daemon_id,
            *(models.Complete(request_id, status_code, response_body(request_id)) for request_id in request_ids),
        )


async def fail(
    store: base.RequestQueue,
    daemon_id: ids.DaemonId,
    request_ids: Sequence[ids.RequestId],
    *,
    code: str = "timeout",
) -> None:
    """claimed -> failed without a response."""
    if request_ids:
        await apply(
            store, daemon_id, *(models.Fail(request_id=request_id, code=code) for request_id in request_ids)
        )


async def run_to_completion(
    store: base.Storage, batch: models.Batch, *, failing: int = 0, model: str = MODEL
) -> ids.DaemonId:
    """Claim every request of the batch (it must be the only one with pending requests of `model`); the first
    `failing` (in line order) fail, the rest complete."""
    daemon_id = await register(store, "runner")
    claimed = await claim(store, daemon_id, model=model)
    by_line = [request.id for request in await all_requests(store, batch.id)]
    assert {item.id for item in claimed} == set(by_line), "claimed something else than the batch's requests"
    await fail(store, daemon_id, by_line[:failing])
    await complete(store, daemon_id, by_line[failing:])
    return daemon_id


async def completed_with_usage(
    store: base.Storage, usages: Sequence[Usage | None], *, owner: str = OWNER, model: str = MODEL
) -> ids.BatchId:
    """A new batch of one request per usage, each claimed and completed with that usage (None: its response
    reported none), as a daemon writes them. No other request of `model` may be pending."""
    batch = await create_batch(store, owner=owner, count=len(usages), model=model)
    daemon = await register(store)
    claimed = sorted(await claim(store, daemon, model=model), key=lambda request: int(request.custom_id[4:]))
    assert [request.batch_id for request in claimed] == [batch.id] * len(usages)
    await apply(
        store, daemon, *(complete_spending(request, usage) for request, usage in zip(claimed, usages, strict=True))
    )
    return batch.id


def complete_spending(request: models.ClaimedRequest, usage: Usage | None) -> models.Complete:
    """A `Complete` of `request` whose response reported `usage`, counted where a daemon counts it."""
    spend = models.Spend(request.batch_id, request.owner, request.model, usage)
    return models.Complete(request.id, 200, response_body(request.id), spend)
