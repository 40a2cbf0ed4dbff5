"""What the mock upstream does with each request: its latency and the faults it injects.

A `Behaviour` is frozen configuration; the server swaps it whole while running (`server.behaviour = ...`).
Fault selection is pure and deterministic given the request's custom id, its attempt number and an injected
`random.Random`, in this order of precedence:

1. `faults_by_custom_id`: a script per custom id, one entry per attempt (`None` = answer normally). Once the
   script is used up the request succeeds; random faults never touch a scripted custom id, so a test can say
   "c7 gets a 500, then succeeds" and rely on it.
2. `fail_first_n_attempts`: the first n attempts of every custom id get `first_attempts_fault`.
3. `error_rates` and `fault_rates`: one draw of the seeded random decides, for everything else.

The attempt number is counted per `X-Fusillade-Custom-Id` by the server; a request without that header has no
attempt number, so only the random rates apply to it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

_Z_99 = 2.3263478740408408
"""The 99th percentile of the standard normal distribution."""

CUSTOM_ID_HEADER = "X-Fusillade-Custom-Id"
"""The header a request's custom id comes in (the daemon sets it): faults counted per custom id use it."""


# ------------------------------------------------------------------------------------------- latency


@dataclass(frozen=True, slots=True)
class FixedLatency:
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"FixedLatency.seconds must be a finite number >= 0, not {self.seconds}.")

    def sample(self, rng: random.Random) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class UniformLatency:
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.high) and 0 <= self.low <= self.high):
            raise ValueError(f"UniformLatency needs 0 <= low <= high, not {self.low}..{self.high}.")

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True, slots=True)
class LogNormalLatency:
    """A long-tailed latency like a real model server's: half the requests take less than `median`, one in a
    hundred takes longer than `p99`."""

    median: float
    p99: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.p99) and 0 < self.median <= self.p99):
            raise ValueError(f"LogNormalLatency needs 0 < median <= p99, not {self.median} and {self.p99}.")

    def sample(self, rng: random.Random) -> float:
        sigma = math.log(self.p99 / self.median) / _Z_99
        return self.median * math.exp(sigma * rng.gauss(0.0, 1.0))


Latency = FixedLatency | UniformLatency | LogNormalLatency
NO_LATENCY = FixedLatency(0.0)


# -------------------------------------------------------------------------------------------- faults


@dataclass(frozen=True, slots=True)
class HttpError:
    """Answer with this status and an OpenAI error envelope. A 429 without its own Retry-After values gets the
    behaviour's defaults."""

    status: int
    message: str | None = None
    retry_after_s: int | None = None
    """Sent as `Retry-After` (whole seconds)."""
    retry_after_ms: int | None = None
    """Sent as `retry-after-ms`."""

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"HttpError.status must be between 400 and 599, not {self.status}.")


@dataclass(frozen=True, slots=True)
class ConnectionReset:
    """Reset the connection (TCP RST) without sending a byte of the response."""


@dataclass(frozen=True, slots=True)
class StallBeforeFirstByte:
    """Wait before sending anything, then answer normally. `seconds=None`: until the client gives up."""

    seconds: float | None = None

    def __post_init__(self) -> None:
        _check_wait(self.seconds)


@dataclass(frozen=True, slots=True)
class StallMidStream:
    """Send `after_events` SSE events, wait, then finish the stream. `seconds=None`: until the client gives up.
    On a JSON answer: send half the body, wait, send the rest."""

    after_events: int = 1
    seconds: float | None = None

    def __post_init__(self) -> None:
        _check_after_events(self.after_events)
        _check_wait(self.seconds)


@dataclass(frozen=True, slots=True)
class TruncatedStream:
    """Send `after_events` SSE events, then close the connection (no end marker). On a JSON answer: close after
    half the announced body."""

    after_events: int = 1

    def __post_init__(self) -> None:
        _check_after_events(self.after_events)


@dataclass(frozen=True, slots=True)
class MalformedEvent:
    """Send `after_events` SSE events, then a data line that is not JSON, then the rest. On a JSON answer: a 200
    whose body is not JSON."""

    after_events: int = 1

    def __post_init__(self) -> None:
        _check_after_events(self.after_events)


@dataclass(frozen=True, slots=True)
class EmbeddedError:
    """Send `after_events` SSE events of a 200 stream, then `data: {"error": {...}}` with `status` as its code,
    and end the stream. On a JSON answer: a 200 whose body is the error envelope."""

    after_events: int = 1
    status: int = 500
    message: str = "The server had an error while processing your request."

    def __post_init__(self) -> None:
        _check_after_events(self.after_events)


@dataclass(frozen=True, slots=True)
class SlowDrip:
    """Send the whole answer (JSON body or SSE stream, headers first) in pieces of `chunk_bytes`, waiting
    `interval_s` before each piece after the first: a slow or congested upstream that never quite stalls. A
    client whose idle timeout is shorter than `interval_s` gives up; one with a longer idle timeout gets the
    whole answer after about `interval_s` times the number of pieces."""

    chunk_bytes: int = 16
    interval_s: float = 0.05

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise ValueError(f"SlowDrip.chunk_bytes must be >= 1, not {self.chunk_bytes}.")
        if not (math.isfinite(self.interval_s) and self.interval_s >= 0):
            raise ValueError(f"SlowDrip.interval_s must be a finite number >= 0, not {self.interval_s}.")

    def pieces(self, payload: bytes) -> list[bytes]:
        """`payload` cut into the pieces sent one by one (at least one, so that an empty body is sent too)."""
        size = self.chunk_bytes
        return [payload[start : start + size] for start in range(0, len(payload), size)] or [b""]


Fault = (
    HttpError
    | ConnectionReset
    | StallBeforeFirstByte
    | StallMidStream
    | TruncatedStream
    | MalformedEvent
    | EmbeddedError
    | SlowDrip
)
StreamFault = StallMidStream | TruncatedStream | MalformedEvent | EmbeddedError


def _check_after_events(after_events: int) -> None:
    if after_events < 0:
        raise ValueError(f"after_events must be >= 0, not {after_events}.")


def _check_wait(seconds: float | None) -> None:
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"A stall must last a finite number of seconds >= 0 (or None: forever), not {seconds}.")


FAULT_KINDS: Mapping[type[Fault], str] = MappingProxyType(
    {
        HttpError: "http_error",
        ConnectionReset: "connection_reset",
        StallBeforeFirstByte: "stall_before_first_byte",
        StallMidStream: "stall_mid_stream",
        TruncatedStream: "truncated_stream",
        MalformedEvent: "malformed_event",
        EmbeddedError: "embedded_error",
        SlowDrip: "slow_drip",
    }
)
"""The name each fault is counted under in the stats."""


# ----------------------------------------------------------------------------------------- behaviour


@dataclass(frozen=True, slots=True, kw_only=True)
class Behaviour:
    latency: Latency = NO_LATENCY
    """Time before the first byte of every answer to a well-formed, authorised request."""
    event_interval_s: float = 0.0
    """Pause between two SSE events."""
    error_rates: Mapping[int, float] = field(default_factory=dict)
    """Share of requests answered with each HTTP error status, e.g. {500: 0.1, 429: 0.05}."""
    fault_rates: Mapping[Fault, float] = field(default_factory=dict)
    """Share of requests that get each other fault, e.g. {ConnectionReset(): 0.01}."""
    faults_by_custom_id: Mapping[str, Sequence[Fault | None]] = field(default_factory=dict)
    """A script per custom id: the fault of each attempt in turn (None: answer normally)."""
    fail_first_n_attempts: int = 0
    """Every custom id's first n attempts get `first_attempts_fault`."""
    first_attempts_fault: Fault = HttpError(500)
    retry_after_s: int | None = 1
    """Default `Retry-After` of a 429 (None: no header)."""
    retry_after_ms: int | None = None
    """Default `retry-after-ms` of a 429 (None: no header)."""
    api_key: str | None = None
    """When set, every request needs `Authorization: Bearer <api_key>`, or gets a 401."""
    seed: int = 0
    """Seed of the random numbers behind error rates and latency; the server reseeds on every change and reset."""
    embedding_dimensions: int = 8
    """Length of an embedding when the request does not say (`dimensions`)."""
    capacity: int | None = None
    """How many requests it serves at once (each taking `latency`); None: any number. Above it, see
    `over_capacity`."""
    over_capacity: Literal["refuse", "queue"] = "refuse"
    """Above `capacity`: "refuse" answers 429 at once (no Retry-After: a gateway's concurrency cap); "queue" holds
    the request until a slot is free, first come first served, so latency grows with load (a model server)."""
    random_faults: tuple[tuple[float, Fault], ...] = field(init=False, repr=False, compare=False)
    """`error_rates` and `fault_rates` together, as (probability, fault) pairs."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.event_interval_s) and self.event_interval_s >= 0):
            raise ValueError(f"Behaviour.event_interval_s must be >= 0, not {self.event_interval_s}.")
        if self.fail_first_n_attempts < 0:
            raise ValueError(f"Behaviour.fail_first_n_attempts must be >= 0, not {self.fail_first_n_attempts}.")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"Behaviour.capacity must be >= 1 (or None), not {self.capacity}.")
        if self.over_capacity not in ("refuse", "queue"):
            raise ValueError(f"Behaviour.over_capacity must be refuse or queue, not {self.over_capacity!r}.")
        if self.embedding_dimensions < 1:
            raise ValueError(f"Behaviour.embedding_dimensions must be >= 1, not {self.embedding_dimensions}.")
        pairs: list[tuple[float, Fault]] = [(rate, HttpError(status)) for status, rate in self.error_rates.items()]
        pairs += [(rate, fault) for fault, rate in self.fault_rates.items()]
        for rate, fault in pairs:
            if not 0 <= rate <= 1:
                raise ValueError(f"The rate of {fault} must be between 0 and 1, not {rate}.")
        if sum(rate for rate, _ in pairs) > 1 + 1e-9:
            raise ValueError("Behaviour.error_rates and fault_rates must add up to at most 1.")
        # Copies, so that a caller mutating its dict cannot change a running server's behaviour.
        object.__setattr__(self, "error_rates", MappingProxyType(dict(self.error_rates)))
        object.__setattr__(self, "fault_rates", MappingProxyType(dict(self.fault_rates)))
        scripts = {custom_id: tuple(script) for custom_id, script in self.faults_by_custom_id.items()}
        object.__setattr__(self, "faults_by_custom_id", MappingProxyType(scripts))
        object.__setattr__(self, "random_faults", tuple((rate, fault) for rate, fault in pairs if rate > 0))

    @property
    def counts_attempts(self) -> bool:
        """Whether any fault depends on the attempt number."""
        return bool(self.faults_by_custom_id) or self.fail_first_n_attempts > 0


def choose_fault(
    behaviour: Behaviour, *, custom_id: str | None, attempt: int | None, rng: random.Random
) -> Fault | None:
    """The fault for one request, or None to answer normally. `attempt` is 0 for the first attempt of
    `custom_id`, None when unknown. Draws from `rng` only when random faults are configured."""
    if custom_id is not None and attempt is not None:
        script = behaviour.faults_by_custom_id.get(custom_id)
        if script is not None:
            return script[attempt] if attempt < len(script) else None
        if attempt < behaviour.fail_first_n_attempts:
            return behaviour.first_attempts_fault
    if not behaviour.random_faults:
        return None
    draw = rng.random()
    for rate, fault in behaviour.random_faults:
        if draw < rate:
            return fault
        draw -= rate
    return None


def retry_after_headers(behaviour: Behaviour, fault: HttpError) -> dict[str, str]:
    """The Retry-After headers of an error answer: the fault's own, else a 429 gets the behaviour's."""
    seconds, milliseconds = fault.retry_after_s, fault.retry_after_ms
    if fault.status == 429 and seconds is None and milliseconds is None:
        seconds, milliseconds = behaviour.retry_after_s, behaviour.retry_after_ms
    headers = {}
    if seconds is not None:
        headers["Retry-After"] = str(seconds)
    if milliseconds is not None:
        headers["retry-after-ms"] = str(milliseconds)
    return headers
