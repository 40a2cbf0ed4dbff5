"""A fake OpenAI-compatible upstream for tests, demos and benchmarks (`fusillade mock-upstream`).

Answers `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and `/v1/responses` as JSON or SSE,
with replies derived from the request (`reply_text`), configurable latency and faults (`Behaviour`), and
counters of what it saw (`UpstreamStats`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fusillade.mock_upstream.behaviour import (
    CUSTOM_ID_HEADER,
    NO_LATENCY,
    Behaviour,
    ConnectionReset,
    EmbeddedError,
    Fault,
    FixedLatency,
    HttpError,
    Latency,
    LogNormalLatency,
    MalformedEvent,
    SlowDrip,
    StallBeforeFirstByte,
    StallMidStream,
    TruncatedStream,
    UniformLatency,
    choose_fault,
)
from fusillade.mock_upstream.responses import embedding_vector, prompt_of, reply_text
from fusillade.mock_upstream.stats import Arrival, UpstreamStats

if TYPE_CHECKING:
    from fusillade.mock_upstream.command import main, run
    from fusillade.mock_upstream.server import MockUpstream

_LAZY = {
    "MockUpstream": "fusillade.mock_upstream.server",
    "main": "fusillade.mock_upstream.command",
    "run": "fusillade.mock_upstream.command",
}
"""Imported when first asked for: the server (aiohttp's web framework) is not loaded by a process that only
registers the `mock-upstream` command, such as every other `fusillade` command."""

__all__ = [
    "CUSTOM_ID_HEADER",
    "NO_LATENCY",
    "Arrival",
    "Behaviour",
    "ConnectionReset",
    "EmbeddedError",
    "Fault",
    "FixedLatency",
    "HttpError",
    "Latency",
    "LogNormalLatency",
    "MalformedEvent",
    "MockUpstream",
    "SlowDrip",
    "StallBeforeFirstByte",
    "StallMidStream",
    "TruncatedStream",
    "UniformLatency",
    "UpstreamStats",
    "choose_fault",
    "embedding_vector",
    "main",
    "prompt_of",
    "reply_text",
    "run",
]


def __getattr__(name: str) -> Any:
    """Import a lazily loaded name from its module the first time it is asked for (PEP 562)."""
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
