"""An owner's usage report: the token usage of completed requests summed by model, by day or by batch (always
split by owner and model, since a cost needs each model's prices), and what it cost. Pure: the rows come from
storage (`UsageStore.usage_report`), the prices from the configuration.

A row counts the completed requests of its group: `requests` of them reported their usage (summed in `usage`),
`unknown` carried none (counted, never guessed). A day is the UTC day the request completed on.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Final

from fusillade.domain import ids
from fusillade.domain.prices import Prices
from fusillade.domain.usage import NO_COST, ZERO, Cost, Usage, cost

EPOCH_DAY: Final = date(1970, 1, 1)
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_SECONDS: Final = re.compile(r"\d{1,12}")


class UsageGrouping(enum.StrEnum):
    """What the rows of a report are (each also split by owner and model)."""

    MODEL = "model"
    DAY = "day"
    """A row per UTC day, owner and model."""
    BATCH = "batch"
    """A row per batch, owner and model."""


GROUPINGS: Final = ", ".join(grouping.value for grouping in UsageGrouping)


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRow:
    """The usage of one group: an owner's model (`day` or `batch_id` set when grouped so)."""

    owner: str
    model: str
    day: date | None = None
    batch_id: ids.BatchId | None = None
    requests: int
    """Completed requests whose response reported usage (summed in `usage`)."""
    unknown: int
    """Completed requests whose response carried no usage."""
    usage: Usage

    @property
    def completed(self) -> int:
        return self.requests + self.unknown


@dataclass(frozen=True, slots=True)
class PricedRow:
    row: UsageRow
    cost: Cost | None
    """None when the row's model has no pricing."""


@dataclass(frozen=True, slots=True)
class UsageReport:
    rows: Sequence[PricedRow]
    requests: int
    unknown: int
    usage: Usage
    cost: Cost | None
    """The sum of the rows' costs; None when a row has none (a model without pricing)."""

    @property
    def completed(self) -> int:
        return self.requests + self.unknown


def priced(rows: Sequence[UsageRow], prices: Prices) -> UsageReport:
    """The report of `rows` at `prices`: each row's cost, and the totals."""
    priced_rows = []
    total: Cost | None = NO_COST
    for row in rows:
        pricing = prices.of(row.model)
        row_cost = None if pricing is None else cost(row.usage, pricing)
        priced_rows.append(PricedRow(row, row_cost))
        total = None if total is None or row_cost is None else total + row_cost
    return UsageReport(
        rows=priced_rows,
        requests=sum(row.requests for row in rows),
        unknown=sum(row.unknown for row in rows),
        usage=sum((row.usage for row in rows), ZERO),
        cost=total if prices.configured else None,
    )


def grouping(text: str) -> UsageGrouping:
    """`model`, `day` or `batch`; `ValueError` with a message naming the choices otherwise."""
    try:
        return UsageGrouping(text.strip().lower())
    except ValueError:
        raise ValueError(f"{text!r} is not a grouping; use one of {GROUPINGS}.") from None


def since_day(text: str, *, seconds: bool = False) -> date:
    """The UTC day of `text`: a date `YYYY-MM-DD`, or (with `seconds`) Unix seconds, the day holding that moment.
    `ValueError` with a message saying what is accepted otherwise."""
    value = text.strip()
    accepted = "a date YYYY-MM-DD" + (" or Unix seconds" if seconds else "")
    if _DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{text!r} is not a date of the calendar; give {accepted}.") from None
    if seconds and _SECONDS.fullmatch(value):
        try:
            return datetime.fromtimestamp(int(value), UTC).date()
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{text!r} is past the last day this server can read; give {accepted}.") from None
    raise ValueError(f"{text!r} is not {accepted} (e.g. 2026-01-31).")


def day_number(day: date) -> int:
    """Days since 1970-01-01 (how SQLite stores a day)."""
    return (day - EPOCH_DAY).days
