"""Backoff for the daemon's own database calls: a failing call is retried after a pause that doubles up to a
cap, and resets once a call succeeds. The daemon never stops because its database is briefly unavailable."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, *, first: float = 0.05, cap: float = 10.0, jitter: float = 0.2) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"Backoff needs 0 < first <= cap, not first={first}, cap={cap}.")
        self._first = first
        self._cap = cap
        self._jitter = jitter
        self._next = first
        self.failures = 0
        """Consecutive failures since the last success."""

    def failed(self) -> float:
        """Record a failure; returns how long to wait before the next try (seconds)."""
        self.failures += 1
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay * (1 - self._jitter + 2 * self._jitter * random.random())

    def succeeded(self) -> None:
        self.failures = 0
        self._next = self._first
