"""Waiting for something to become true, without fixed sleeps: poll with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    check: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    within: float = 30.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Call `check` until it returns something truthy (awaiting it if it is a coroutine); return that value.
    Fails with `message` and the last value seen when `within` seconds pass first."""
    deadline = time.monotonic() + within
    last: object = None
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"Timed out after {within} s waiting for {message}; last value: {last!r}")
        await asyncio.sleep(interval)
