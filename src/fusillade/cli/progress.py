"""The live progress display of `fusillade run`: a bar with requests done, failed and in flight, attempts
retried, the rate over the last half minute, and the time left at that rate.

```
requests.jsonl ━━━━━━━╸━━━━━━━━  2,310/5,000  2,298 done  12 failed  64 in flight  7 retried  85.2/s  0:00:31
```

On a terminal the line is redrawn in place; elsewhere (a pipe, a CI log) rich prints only its final state.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fusillade.domain import models

RATE_WINDOW = 30.0
"""Seconds of progress the rate and the time left are computed from."""


class _RateColumn(ProgressColumn):
    """Requests finished per second (rich's own speed estimate, over `RATE_WINDOW`)."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:,.1f}/s" if speed else "-/s", style="progress.data.speed")


class RunProgress:
    """A bar for one batch; `update` it with fresh counts. Use it as a context manager."""

    def __init__(self, console: Console, description: str, counts: models.RequestCounts) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[green]{task.fields[done]} done"),
            TextColumn("[red]{task.fields[failed]} failed"),
            TextColumn("{task.fields[in_flight]} in flight"),
            TextColumn("[yellow]{task.fields[retries]} retried"),
            _RateColumn(),
            TimeRemainingColumn(),
            console=console,
            speed_estimate_period=RATE_WINDOW,
        )
        self._task: TaskID = self._progress.add_task(description, total=counts.total, completed=counts.terminal)
        self.update(counts, in_flight=0, retries=0)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def update(self, counts: models.RequestCounts, *, in_flight: int, retries: int) -> None:
        """`retries`: failed attempts scheduled again (a failing upstream shows here before any request fails)."""
        self._progress.update(
            self._task,
            completed=counts.terminal,
            done=f"{counts.completed:,}",
            failed=f"{counts.failed + counts.canceled:,}",
            in_flight=f"{in_flight:,}",
            retries=f"{retries:,}",
        )

    def note(self, message: str) -> None:
        """Print a line above the bar."""
        self._progress.console.print(message, highlight=False, markup=False)

    def stop(self) -> None:
        """Stop redrawing and leave the last state on screen (idempotent)."""
        self._progress.stop()
