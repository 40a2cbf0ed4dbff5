"""The headers the daemon adds to an upstream call beyond the client's own: chosen batch metadata
(`x-fusillade-batch-<key>`, `batch_metadata_headers`) and a W3C `traceparent` (`traceparent`).

A batch's metadata headers are read once per batch and kept in a small cache: thousands of calls of one batch
cost one read. Metadata never changes after a batch is created, so the cache is never stale; it is emptied
when full (a daemon serves few batches at once).
"""

from __future__ import annotations

import secrets

from fusillade import errors
from fusillade.daemon.loops import LoopContext
from fusillade.domain import ids, models
from fusillade.storage.base import BatchStore

HEADER_SAFE_METADATA = 256
"""Longest metadata value sent as a header; longer ones are left out (a header is no place for an essay)."""
CACHED_BATCHES = 1024


class BatchHeaders:
    def __init__(self, batches: BatchStore, context: LoopContext) -> None:
        self._batches = batches
        self._context = context
        self._cache: dict[ids.BatchId, dict[str, str]] = {}

    def wanted(self) -> bool:
        """Whether the settings in force ask for any extra header (most runs: no, and no call waits here)."""
        settings = self._context.settings
        return settings.traceparent or bool(settings.batch_metadata_headers)

    async def for_call(self, request: models.ClaimedRequest) -> dict[str, str] | None:
        """The extra headers of the request's call (None: none), from the settings in force."""
        settings = self._context.settings
        headers = {"traceparent": traceparent(request)} if settings.traceparent else None
        if settings.batch_metadata_headers:
            headers = {**(await self._metadata_headers(request.batch_id)), **(headers or {})}
        return headers

    async def _metadata_headers(self, batch_id: ids.BatchId) -> dict[str, str]:
        headers = self._cache.get(batch_id)
        if headers is None:
            try:
                batch = await self._batches.get_batch(batch_id, owner=models.ALL_OWNERS)
            except errors.FusilladeError:
                return {}  # the call goes without them rather than not at all
            metadata = batch.metadata or {}
            headers = {
                f"x-fusillade-batch-{key.lower()}": value
                for key in self._context.settings.batch_metadata_headers
                if (value := metadata.get(key)) is not None and _header_safe(value)
            }
            if len(self._cache) >= CACHED_BATCHES:
                self._cache.clear()
            self._cache[batch_id] = headers
        return headers


def traceparent(request: models.ClaimedRequest) -> str:
    """A W3C trace context header: version 00, the request id as trace id, a random span id, sampled."""
    return f"00-{request.id.hex}-{secrets.token_hex(8)}-01"


def _header_safe(value: str) -> bool:
    return len(value) <= HEADER_SAFE_METADATA and value.isprintable() and value.isascii()
