"""What the mock upstream has seen, for tests to assert on and benchmarks to report.

Memory stays flat under load except for `attempts_by_custom_id`, which grows with the number of custom ids;
a benchmark that does not need it turns it off (`track_custom_ids=False`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RECORDED_HEADER_PREFIX = "x-fusillade-"
RECORDED_HEADERS = frozenset({"authorization", "traceparent"})


@dataclass(frozen=True, slots=True)
class Arrival:
    """When one attempt arrived, on both clocks."""

    monotonic: float
    """`time.monotonic()`, to measure gaps between attempts (backoff)."""
    wall: float
    """`time.time()`, to compare with timestamps stored by fusillade."""


class UpstreamStats:
    """Counters kept by the server. Read them directly in-process, or as JSON from `GET /stats`."""

    def __init__(self, *, header_history: int = 1000) -> None:
        self.requests_total = 0
        self.requests_by_model: dict[str, int] = {}
        self.requests_by_path: dict[str, int] = {}
        self.attempts_by_custom_id: dict[str, list[Arrival]] = {}
        """Every attempt of each `X-Fusillade-Custom-Id`, in arrival order."""
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_by_model: dict[str, int] = {}
        """Requests from arrival until the answer is sent in full or the client goes away."""
        self.max_in_flight_by_model: dict[str, int] = {}
        self.responses_by_status: dict[int, int] = {}
        """Answers whose status line was sent (a stream counts as 200 even if a fault follows)."""
        self.faults_by_kind: dict[str, int] = {}
        """Injected faults, by the names of `behaviour.FAULT_KINDS`."""
        self.client_disconnects = 0
        """Requests whose client went away before the answer was complete."""
        self.recent_headers: deque[dict[str, str]] = deque(maxlen=header_history)
        """The `x-fusillade-*`, `authorization` and `traceparent` headers of the last requests (names in lower
        case), oldest first."""

    def record_arrival(
        self,
        *,
        path: str,
        model: str,
        custom_id: str | None,
        headers: Mapping[str, str],
        arrival: Arrival,
        track_custom_id: bool,
    ) -> int | None:
        """Count a request and return its attempt number (0 for the first) when its custom id is tracked."""
        self.requests_total += 1
        self.requests_by_model[model] = self.requests_by_model.get(model, 0) + 1
        self.requests_by_path[path] = self.requests_by_path.get(path, 0) + 1
        recorded = {
            lowered: value
            for name, value in headers.items()
            if (lowered := name.lower()).startswith(RECORDED_HEADER_PREFIX) or lowered in RECORDED_HEADERS
        }
        if recorded:
            self.recent_headers.append(recorded)
        if custom_id is None or not track_custom_id:
            return None
        attempts = self.attempts_by_custom_id.setdefault(custom_id, [])
        attempts.append(arrival)
        return len(attempts) - 1

    def enter(self, model: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        current = self.in_flight_by_model.get(model, 0) + 1
        self.in_flight_by_model[model] = current
        if current > self.max_in_flight_by_model.get(model, 0):
            self.max_in_flight_by_model[model] = current

    def leave(self, model: str) -> None:
        self.in_flight -= 1
        self.in_flight_by_model[model] -= 1

    def count_response(self, status: int) -> None:
        self.responses_by_status[status] = self.responses_by_status.get(status, 0) + 1

    def count_fault(self, kind: str) -> None:
        self.faults_by_kind[kind] = self.faults_by_kind.get(kind, 0) + 1

    def reset(self) -> None:
        """Forget everything but the requests still in flight (their maxima restart from them)."""
        self.requests_total = 0
        self.requests_by_model.clear()
        self.requests_by_path.clear()
        self.attempts_by_custom_id.clear()
        self.max_in_flight = self.in_flight
        self.in_flight_by_model = {model: count for model, count in self.in_flight_by_model.items() if count}
        self.max_in_flight_by_model = dict(self.in_flight_by_model)
        self.responses_by_status.clear()
        self.faults_by_kind.clear()
        self.client_disconnects = 0
        self.recent_headers.clear()

    def to_json(self) -> dict[str, Any]:
        """The stats as JSON-ready values (status codes become strings, arrivals become objects)."""
        return {
            "requests_total": self.requests_total,
            "requests_by_model": self.requests_by_model,
            "requests_by_path": self.requests_by_path,
            "attempts_by_custom_id": {
                custom_id: [{"monotonic": arrival.monotonic, "wall": arrival.wall} for arrival in arrivals]
                for custom_id, arrivals in self.attempts_by_custom_id.items()
            },
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "in_flight_by_model": self.in_flight_by_model,
            "max_in_flight_by_model": self.max_in_flight_by_model,
            "responses_by_status": {str(status): count for status, count in self.responses_by_status.items()},
            "faults_by_kind": self.faults_by_kind,
            "client_disconnects": self.client_disconnects,
            "recent_headers": list(self.recent_headers),
        }
