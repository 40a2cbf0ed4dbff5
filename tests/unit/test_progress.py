"""The progress display of `fusillade run`: the bar fitted to a fixed-width console, the plain lines for logs
and pipes, and the rate and time left on a simulated clock."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fusillade.cli import progress
from fusillade.domain import models

MIDWAY = progress.Snapshot(
    finished=2310, total=5000, completed=2298, failed=12, in_flight=64, retries=7, rate=85.2
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counts(*, total: int, completed: int = 0, failed: int = 0, pending: int | None = None) -> models.RequestCounts:
    left = total - completed - failed if pending is None else pending
    return models.RequestCounts(
        total=total, pending=left, in_progress=0, completed=completed, failed=failed, canceled=0
    )


def rendered(snapshot: progress.Snapshot, width: int, name: str = "requests.jsonl") -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, record=True, legacy_windows=False)
    console.print(progress.bar_line(name, snapshot, width))
    return console.export_text().rstrip("\n")


def test_on_80_columns_the_bar_keeps_count_failed_rate_and_time_left_whole() -> None:
    line = rendered(MIDWAY, 80)

    assert "\n" not in line and len(line) <= 80
    assert "2,310/5,000" in line
    assert "12 failed" in line
    assert "85.2/s" in line
    assert "0:00:32 left" in line  # 2,690 left at 85.2/s
    assert "64 in flight" in line
    assert "…" not in line and "..." not in line  # nothing cut in the middle


def test_the_least_important_parts_drop_first_as_the_terminal_narrows() -> None:
    wide = rendered(MIDWAY, 200)
    assert wide.startswith("requests.jsonl ")
    assert "2,298 done" in wide and "7 retried" in wide

    narrow = rendered(MIDWAY, 45)
    assert len(narrow) <= 45
    assert "2,310/5,000" in narrow and "12 failed" in narrow and "85.2/s" in narrow and "left" in narrow
    assert "requests.jsonl" not in narrow and "retried" not in narrow and "in flight" not in narrow

    tiny = rendered(MIDWAY, 12)
    assert tiny == "2,310/5,000"


@pytest.mark.parametrize("width", [20, 40, 60, 80, 100, 120, 160])
def test_no_width_overflows(width: int) -> None:
    line = rendered(MIDWAY, width, name="a-very-long-input-file-name-from-a-pipeline.jsonl")
    assert "\n" not in line and len(line) <= width


def test_time_left_is_unknown_until_there_is_a_rate() -> None:
    assert progress.Snapshot(0, 10, 0, 0, 0, 0, rate=None).time_left == "-:--:--"
    assert progress.Snapshot(0, 10, 0, 0, 0, 0, rate=0.0).time_left == "-:--:--"
    assert progress.Snapshot(10, 10, 10, 0, 0, 0, rate=None).time_left == "0:00:00"
    assert progress.Snapshot(0, 36_000, 0, 0, 0, 0, rate=2.0).time_left == "5:00:00"


def test_the_rate_is_taken_over_the_last_window_only() -> None:
    clock = Clock()
    rate = progress.RateWindow(window=30.0, clock=clock)
    rate.add(0)
    assert rate.per_second is None
    for _ in range(60):  # 10 per second for a minute
        clock.now += 1
        rate.add(rate_total := int((clock.now - 1000) * 10))
    assert rate.per_second == pytest.approx(10.0)
    for _ in range(30):  # then nothing finishes for 30 s: the old speed has left the window
        clock.now += 1
        rate.add(rate_total)
    assert rate.per_second == pytest.approx(0.0)


def test_plain_lines_come_every_interval_and_at_the_end() -> None:
    clock = Clock()
    output = io.StringIO()
    console = Console(file=output, width=200, color_system=None)
    assert not console.is_terminal
    display = progress.LineProgress(console, "in.jsonl", counts(total=100), interval=5.0, clock=clock)

    with display:
        for second in range(1, 13):
            clock.now += 1
            display.update(counts(total=100, completed=second * 5, failed=second // 6), in_flight=3, retries=1)

    lines = output.getvalue().splitlines()
    assert lines == [
        "in.jsonl: 0/100 (0%), 0 failed, 0 in flight, 0 retried, -/s, -:--:-- left",
        "in.jsonl: 25/100 (25%), 0 failed, 3 in flight, 1 retried, 5.0/s, 0:00:15 left",
        "in.jsonl: 51/100 (51%), 1 failed, 3 in flight, 1 retried, 5.1/s, 0:00:10 left",
        "in.jsonl: 62/100 (62%), 2 failed, 3 in flight, 1 retried, 5.2/s, 0:00:07 left",
    ]


def test_the_display_follows_the_console_and_quiet() -> None:
    pipe = Console(file=io.StringIO())
    terminal = Console(file=io.StringIO(), force_terminal=True)
    start = counts(total=3)

    assert isinstance(progress.for_console(pipe, "x", quiet=False)(start), progress.LineProgress)
    assert isinstance(progress.for_console(terminal, "x", quiet=False)(start), progress.BarProgress)
    quiet = progress.for_console(pipe, "x", quiet=True)(start)
    assert isinstance(quiet, progress.NoProgress)
    with quiet:
        quiet.update(counts(total=3, completed=3), in_flight=0, retries=0)
    assert pipe.file.getvalue() == ""  # type: ignore[attr-defined]
