"""A fake OpenAI-compatible upstream for tests, demos and benchmarks (`fusillade mock-upstream`).

Answers `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and `/v1/responses` as JSON or SSE,
with replies derived from the request (`reply_text`), configurable latency and faults (`Behaviour`), and
counters of what it saw (`UpstreamStats`).
"""

from __future__ import annotations

from fusillade.mock_upstream.behaviour import (
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
from fusillade.mock_upstream.command import main, run
from fusillade.mock_upstream.responses import embedding_vector, prompt_of, reply_text
from fusillade.mock_upstream.server import CUSTOM_ID_HEADER, MockUpstream
from fusillade.mock_upstream.stats import Arrival, UpstreamStats

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
