"""An adaptive concurrency limit: how many calls of one model to keep in flight, found from what the upstream
says back. Pure: the caller passes the times (monotonic seconds) and the in-flight counts.

Two signals, two kinds of upstream:
- **Refusals** (429, 503, connections refused, timeouts): a gateway or a provider that refuses above its
  capacity. The limit is cut multiplicatively (`OVERLOAD_CUT`), at most once per round trip: a refusal of a call
  sent before the last cut says nothing about the cut limit and is ignored.
- **Latency** (vLLM, SGLang, llama.cpp queue instead of refusing): the calls sent since the last cut are taken in
  windows (`WINDOW_CALLS`, or two limits' worth if more), and each window's mean latency is compared with the
  latency at low load (`baseline`): above `QUEUEING_RATIO` times it, calls are waiting in the upstream's queue,
  and the limit is cut to a little below `limit * baseline / mean`, the number of calls the upstream serves
  without queueing (Little's law).

While neither signal fires and the limit is in use, it grows: by one per success at first (doubling every round
trip, like TCP's slow start, until the first cut), then by one call or `GROWTH` of itself per round trip,
whichever is more.

The baseline is measured on the calls sent with at most the limit of the last cut in flight (the low point of
the limit's saw-tooth; before the first cut, at most the limit when the first window was complete): means of
windows of them (`BASELINE_WINDOW_CALLS`), and the median of the recent ones (`BASELINE_WINDOWS`). Calls sent
at the saw-tooth's peaks never enter it, so the queueing the limit itself causes cannot raise it (a ratchet); a
real change of the upstream's speed (a longer prompt mix, a slower model) moves it once most remembered windows
show it; and a latency cut goes a little below the knee (`BELOW_KNEE`), so that a baseline measured too high
comes down. Means and medians rather than single latencies, because an LLM call's latency varies with its length
more than with load.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

OVERLOAD_CUT = 0.85
"""The limit is multiplied by this on a refusal."""
QUEUEING_RATIO = 1.25
"""A window's mean latency above this multiple of the baseline means the upstream is queueing."""
GROWTH = 0.05
"""After slow start the limit grows by this share of itself per round trip (at least one call)."""
BELOW_KNEE = 0.9
"""A latency cut goes this much below the knee it computed, so that the calls at its low point measure the
baseline without queueing even when the baseline is too high (else any baseline would hold itself up)."""
LARGEST_CUT = 0.5
"""No single cut takes more than half of the limit."""
WINDOW_CALLS = 24
"""The fewest calls in a latency window."""
SLOW_START_WINDOW_CALLS = 8
"""The fewest calls in a latency window during slow start (about a round trip's: the knee must show early)."""
BASELINE_WINDOW_CALLS = 16
"""Calls at low load in a baseline window (the first: `SLOW_START_WINDOW_CALLS`)."""
BASELINE_WINDOWS = 9
"""How many recent baseline windows the baseline is the median of."""


class _Mean:
    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    def take(self) -> float:
        mean = self.total / self.count
        self.total, self.count = 0.0, 0
        return mean


class AdaptiveLimit:
    """The limit of one model's lane, between `floor` and `ceiling`; it starts at `floor`."""

    __slots__ = (
        "_baselines",
        "_ceiling",
        "_cut_at",
        "_floor",
        "_limit",
        "_low_load",
        "_slow_start",
        "_trough",
        "_window",
    )

    def __init__(self, floor: int, ceiling: int) -> None:
        _check_bounds(floor, ceiling)
        self._floor, self._ceiling = floor, ceiling
        self._limit = float(floor)
        self._slow_start = True
        self._cut_at = -math.inf
        """When the limit was last cut (monotonic): calls sent before then neither cut it again nor count in
        a latency window."""
        self._trough = math.inf
        """The limit of the last cut: calls sent with at most this many in flight measure the baseline."""
        self._window = _Mean()
        self._low_load = _Mean()
        self._baselines: deque[float] = deque(maxlen=BASELINE_WINDOWS)

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def floor(self) -> int:
        return self._floor

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def baseline(self) -> float | None:
        """The latency at low load (seconds), once measured."""
        return statistics.median(self._baselines) if self._baselines else None

    def bound(self, floor: int, ceiling: int) -> None:
        """New bounds (a configuration reload): the limit found so far is kept, within them."""
        _check_bounds(floor, ceiling)
        self._floor, self._ceiling = floor, ceiling
        self._limit = min(max(self._limit, floor), ceiling)

    def overloaded(self, *, sent_at: float, now: float) -> bool:
        """A call sent at `sent_at` was refused for overload. True if the limit was cut."""
        if sent_at < self._cut_at:
            return False
        self._cut(self._limit * OVERLOAD_CUT, now)
        return True

    def succeeded(self, *, sent_at: float, in_flight: int, latency: float, now: float) -> bool:
        """A call sent at `sent_at`, with `in_flight` calls of the model in flight then (itself included),
        succeeded after `latency` seconds. True if the limit was cut (the upstream is queueing)."""
        if not (math.isfinite(latency) and latency >= 0):
            return False
        if in_flight <= self._trough:
            low_load = self._low_load
            low_load.add(latency)
            if low_load.count >= (BASELINE_WINDOW_CALLS if self._baselines else SLOW_START_WINDOW_CALLS):
                self._baselines.append(low_load.take())
                # Slow start goes on past the load of this first measure, maybe into the upstream's queue.
                self._trough = min(self._trough, self.limit)
        if sent_at < self._cut_at:
            return False  # sent under the limit before the cut: says nothing about the limit now
        window = self._window
        window.add(latency)
        if self._baselines and window.count >= self._window_size():
            mean, baseline = window.take(), statistics.median(self._baselines)
            if mean > baseline * QUEUEING_RATIO:
                self._cut(self._limit * baseline / mean * BELOW_KNEE, now)
                return True
        if in_flight >= self.limit:  # the limit held calls back: it is in use, and may grow
            growth = 1.0 if self._slow_start else max(1.0, self._limit * GROWTH) / self._limit
            self._limit = min(float(self._ceiling), self._limit + growth)
        return False

    def _window_size(self) -> int:
        if self._slow_start:
            return max(SLOW_START_WINDOW_CALLS, self.limit)
        return max(WINDOW_CALLS, 2 * self.limit)

    def _cut(self, limit: float, now: float) -> None:
        self._limit = max(float(self._floor), limit, self._limit * LARGEST_CUT)
        self._slow_start = False
        self._cut_at = now
        self._trough = self.limit
        self._window = _Mean()


def _check_bounds(floor: int, ceiling: int) -> None:
    if not 1 <= floor <= ceiling:
        raise ValueError(f"An adaptive limit needs 1 <= floor <= ceiling, not {floor} and {ceiling}.")
