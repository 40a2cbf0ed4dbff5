"""Interpreter settings for fusillade's long-running processes (the CLI applies them before its event loop
starts; a program embedding the daemon may call `tune_interpreter` too).

- Garbage collection: the daemon allocates a few dozen short-lived objects per request (futures, tasks,
  records); with the default threshold (700 allocations) the collector runs thousands of times a second and
  walks every young object each time, about a tenth of the daemon's CPU at full speed. Freezing what startup
  created and collecting the young generation every 20,000 allocations instead keeps that under 1% while
  reference counting still frees almost everything at once (only cyclic garbage waits for a collection).
- Thread switching: the SQLite backend runs its statements in a writer thread. While the event loop is busy,
  that thread waits for the GIL up to the switch interval (5 ms by default) every time it needs it back; at
  1 ms a daemon tick (one transaction) waits less, and the loop gives up little.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

YOUNG_GENERATION_THRESHOLD = 20_000
SWITCH_INTERVAL_S = 0.001
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
"""Log lines of the long-running commands, on stderr."""


def tune_interpreter() -> None:
    """Apply the settings above to this process (idempotent)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` in a new event loop: uvloop's when it is installed (the upstream client is faster on it), with
    the interpreter tuned for a long-running process."""
    tune_interpreter()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


@contextlib.contextmanager
def stop_signals_handled(handler: Callable[[], None]) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT call `handler` on the running event loop (instead of killing the
    process or raising `KeyboardInterrupt`), so that a command stops in order."""
    loop = asyncio.get_running_loop()
    numbers = (signal.SIGTERM, signal.SIGINT)
    for number in numbers:
        loop.add_signal_handler(number, handler)
    try:
        yield
    finally:
        for number in numbers:
            loop.remove_signal_handler(number)
