"""The progress display of `fusillade run`, in three forms chosen by where stderr goes:

- a terminal: a bar redrawn in place, fitted to the terminal's width: the parts that matter least drop
  first (the file name, then the done and retried counts...), so that on 80 columns done/total, failed,
  in flight, rate and time left stay visible:

  ```
  requests.jsonl ━━━━━━━╸━━━━━━━ 2,310/5,000 2,298 done 12 failed 64 in flight 7 retried 85.2/s 0:00:31 left
  ```
- anything else (a file, a pipe, a CI log): one plain line every few seconds, and one at the end;
- `--quiet`: nothing.

The rate is the requests finished per second over the last `RATE_WINDOW` seconds; the time left is what
remains at that rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fusillade.domain import models

RATE_WINDOW = 30.0
"""Seconds of progress the rate and the time left are computed from."""
LINE_INTERVAL = 5.0
"""Seconds between two plain progress lines."""
_BAR_WIDTHS = (10, 40)
"""Narrowest and widest bar; narrower than 10 columns a bar says nothing and is left out."""

Clock = Callable[[], float]


class Display(Protocol):
    """What `fusillade run` drives while a batch runs; use it as a context manager."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None: ...

    def update(self, counts: models.RequestCounts, *, in_flight: int, retries: int) -> None:
        """Fresh counts; `retries`: failed attempts scheduled again (a failing upstream shows here before any
        request fails)."""

    def note(self, message: str) -> None:
        """Print a line (above the bar, on a terminal)."""

    def stop(self) -> None:
        """Stop showing progress (idempotent)."""


class _Shown:
    """A display as a context manager: `start` on entering, `stop` on leaving."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Show the first state."""

    def stop(self) -> None:
        """Stop showing progress (idempotent)."""


# ------------------------------------------------------------------------------------------ the figures


class RateWindow:
    """Requests finished per second over the last `window` seconds, from samples of the finished count."""

    def __init__(self, *, window: float = RATE_WINDOW, clock: Clock = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, finished: int) -> None:
        now = self._clock()
        self._samples.append((now, finished))
        # Keep one sample at or before the window's start, so that the rate spans the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()

    @property
    def per_second(self) -> float | None:
        """None until two samples are at least a tenth of a second apart."""
        if len(self._samples) < 2:
            return None
        (first_time, first_count), (last_time, last_count) = self._samples[0], self._samples[-1]
        elapsed = last_time - first_time
        return (last_count - first_count) / elapsed if elapsed >= 0.1 else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a display shows at one moment, as text."""

    finished: int
    total: int
    completed: int
    failed: int
    in_flight: int
    retries: int
    rate: float | None
    """Requests finished per second, None while unknown."""

    @property
    def count(self) -> str:
        return f"{self.finished:,}/{self.total:,}"

    @property
    def rate_text(self) -> str:
        return f"{self.rate:,.1f}/s" if self.rate is not None else "-/s"

    @property
    def time_left(self) -> str:
        """H:MM:SS at the current rate; "-:--:--" while the rate is unknown or zero."""
        remaining = self.total - self.finished
        if remaining <= 0:
            return "0:00:00"
        if not self.rate:
            return "-:--:--"
        seconds = round(remaining / self.rate)
        hours, rest = divmod(seconds, 3600)
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"

    def line(self, name: str) -> str:
        """The plain line: `requests.jsonl: 2,310/5,000 (46%), 12 failed, 64 in flight, 7 retried, 85.2/s,
        0:00:31 left`."""
        percent = 100 * self.finished // self.total if self.total else 100
        return (
            f"{name}: {self.count} ({percent}%), {self.failed:,} failed, {self.in_flight:,} in flight, "
            f"{self.retries:,} retried, {self.rate_text}, {self.time_left} left"
        )


class _Figures:
    """The latest counts and the rate window, shared by the displays."""

    def __init__(self, counts: models.RequestCounts, clock: Clock) -> None:
        self.rate = RateWindow(clock=clock)
        self.snapshot = self._take(counts, in_flight=0, retries=0)

    def update(self, counts: models.RequestCounts, *, in_flight: int, retries: int) -> Snapshot:
        self.snapshot = self._take(counts, in_flight=in_flight, retries=retries)
        return self.snapshot

    def _take(self, counts: models.RequestCounts, *, in_flight: int, retries: int) -> Snapshot:
        self.rate.add(counts.terminal)
        return Snapshot(
            finished=counts.terminal,
            total=counts.total,
            completed=counts.completed,
            failed=counts.failed + counts.canceled,
            in_flight=in_flight,
            retries=retries,
            rate=self.rate.per_second,
        )


# ------------------------------------------------------------------------------------------ on a terminal


@dataclass(frozen=True, slots=True)
class _Part:
    order: int
    """Left to right."""
    text: Text | None
    """None: the bar."""


def fitted_parts(name: str, snapshot: Snapshot, width: int) -> list[_Part]:
    """The parts of the bar line that fit in `width` columns, in display order. Parts are taken by importance
    (done/total, failed, rate, time left, the bar, in flight, retried, done, the file name) until one does not
    fit, one column apart; the bar takes what is left, between 10 and 40 columns."""
    by_importance = [
        _Part(2, Text(snapshot.count, style="bold")),
        _Part(4, Text(f"{snapshot.failed:,} failed", style="red")),
        _Part(7, Text(snapshot.rate_text, style="progress.data.speed")),
        _Part(8, Text(f"{snapshot.time_left} left", style="progress.remaining")),
        _Part(1, None),
        _Part(5, Text(f"{snapshot.in_flight:,} in flight")),
        _Part(6, Text(f"{snapshot.retries:,} retried", style="yellow")),
        _Part(3, Text(f"{snapshot.completed:,} done", style="green")),
        _Part(0, Text(name, style="bold", overflow="ellipsis", no_wrap=True)),
    ]
    chosen: list[_Part] = []
    used = -1  # n parts need n - 1 separating columns
    for part in by_importance:
        needed = _BAR_WIDTHS[0] if part.text is None else part.text.cell_len
        if used + 1 + needed > width:
            break  # a less important part never takes the place of a more important one
        chosen.append(part)
        used += 1 + needed
    return sorted(chosen, key=lambda part: part.order)


def bar_line(name: str, snapshot: Snapshot, width: int) -> RenderableType:
    """One line of at most `width` columns (see `fitted_parts`)."""
    parts = fitted_parts(name, snapshot, width)
    texts_width = sum(part.text.cell_len for part in parts if part.text is not None) + len(parts) - 1
    grid = Table.grid(padding=(0, 1))
    cells: list[RenderableType] = []
    for part in parts:
        if part.text is not None:
            grid.add_column(no_wrap=True)
            cells.append(part.text)
        else:
            bar_width = min(_BAR_WIDTHS[1], width - texts_width)
            grid.add_column(width=bar_width, no_wrap=True)
            cells.append(ProgressBar(total=max(snapshot.total, 1), completed=snapshot.finished, width=bar_width))
    grid.add_row(*cells)
    return grid


class _FittedLine:
    """A renderable that draws `bar_line` at the width it is given (rich's `Live` redraws it)."""

    def __init__(self, render: Callable[[int], RenderableType]) -> None:
        self._render = render

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._render(options.max_width)


class BarProgress(_Shown):
    """The bar, on a terminal."""

    def __init__(
        self, console: Console, name: str, counts: models.RequestCounts, *, clock: Clock = time.monotonic
    ) -> None:
        self._name = name
        self._figures = _Figures(counts, clock)
        line = _FittedLine(lambda width: bar_line(name, self._figures.snapshot, width))
        self._live = Live(line, console=console, refresh_per_second=5, redirect_stdout=False)

    def start(self) -> None:
        self._live.start()

    def update(self, counts: models.RequestCounts, *, in_flight: int, retries: int) -> None:
        self._figures.update(counts, in_flight=in_flight, retries=retries)

    def note(self, message: str) -> None:
        self._live.console.print(message, highlight=False, markup=False)

    def stop(self) -> None:
        """Stop redrawing and leave the last state on screen (idempotent)."""
        self._live.stop()


# ------------------------------------------------------------------------------------- in a file or pipe


class LineProgress(_Shown):
    """A plain line every `interval` seconds (and at the start and the end), for logs and pipes."""

    def __init__(
        self,
        console: Console,
        name: str,
        counts: models.RequestCounts,
        *,
        interval: float = LINE_INTERVAL,
        clock: Clock = time.monotonic,
    ) -> None:
        self._console = console
        self._name = name
        self._interval = interval
        self._clock = clock
        self._figures = _Figures(counts, clock)
        self._last_line: float | None = None
        self._stopped = False

    def start(self) -> None:
        self._print()

    def update(self, counts: models.RequestCounts, *, in_flight: int, retries: int) -> None:
        self._figures.update(counts, in_flight=in_flight, retries=retries)
        if self._last_line is None or self._clock() - self._last_line >= self._interval:
            self._print()

    def note(self, message: str) -> None:
        self._console.print(message, highlight=False, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._print()

    def _print(self) -> None:
        self._last_line = self._clock()
        self.note(self._figures.snapshot.line(self._name))


class NoProgress(_Shown):
    """`--quiet`: notes only."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def update(self, counts: models.RequestCounts, *, in_flight: int, retries: int) -> None:
        pass

    def note(self, message: str) -> None:
        self._console.print(message, highlight=False, markup=False, soft_wrap=True)


def for_console(
    console: Console, name: str, *, quiet: bool, interval: float = LINE_INTERVAL
) -> Callable[[models.RequestCounts], Display]:
    """The display that suits `console`: the bar on a terminal, lines elsewhere, nothing when `quiet`."""
    if quiet:
        return lambda counts: NoProgress(console)
    if console.is_terminal:
        return lambda counts: BarProgress(console, name, counts)
    return lambda counts: LineProgress(console, name, counts, interval=interval)
