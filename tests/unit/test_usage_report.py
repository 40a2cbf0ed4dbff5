"""`domain.usage_report`: pricing the rows of a usage report (a row without pricing has no cost, and then the total
has none either), and reading the grouping and first day a caller asks for."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from fusillade.domain.prices import NO_PRICES, Prices
from fusillade.domain.usage import Cost, Pricing, Usage
from fusillade.domain.usage_report import UsageGrouping, UsageRow, day_number, grouping, priced, since_day

A = UsageRow(owner="alice", model="model-a", requests=2, unknown=1, usage=Usage(1_000_000, 200_000, 500_000, 7))
B = UsageRow(owner="bob", model="model-b", requests=1, unknown=0, usage=Usage(40, 0, 2, 0))
PRICED_A = Prices(routed={"model-a": Pricing.per_million(input="0.15", cached_input="0.075", output="0.6")})


def test_each_row_is_priced_and_the_total_sums_them() -> None:
    prices = Prices(routed={"model-a": PRICED_A.routed["model-a"]}, default=Pricing.per_million(input=1, output=2))
    report = priced([A, B], prices)
    assert [row.cost for row in report.rows] == [
        Cost(Decimal("0.135"), Decimal("0.3")),
        Cost(Decimal("0.00004"), Decimal("0.000004")),  # model-b: the default route's pricing
    ]
    assert report.cost == Cost(Decimal("0.13504"), Decimal("0.300004"))
    assert (report.requests, report.unknown, report.completed) == (3, 1, 4)
    assert report.usage == Usage(1_000_040, 200_000, 500_002, 7)


def test_a_model_without_pricing_has_no_cost_and_neither_has_the_total() -> None:
    report = priced([A, B], PRICED_A)
    assert [row.cost is None for row in report.rows] == [False, True]
    assert report.cost is None


def test_without_any_pricing_nothing_has_a_cost() -> None:
    assert priced([A], NO_PRICES).cost is None
    assert priced([], NO_PRICES).cost is None
    empty = priced([], PRICED_A)
    assert empty.cost == Cost(Decimal(0), Decimal(0)) and empty.usage == Usage() and empty.rows == []


def test_a_grouping_is_read_whatever_its_case_and_a_wrong_one_names_the_choices() -> None:
    assert grouping("Day") is UsageGrouping.DAY
    with pytest.raises(ValueError, match="use one of model, day, batch"):
        grouping("week")


@pytest.mark.parametrize(
    ("text", "seconds", "expected"),
    [
        ("2026-03-01", False, date(2026, 3, 1)),
        ("2026-03-01", True, date(2026, 3, 1)),
        ("1772409599", True, date(2026, 3, 1)),  # 23:59:59 UTC
        ("1772409600", True, date(2026, 3, 2)),
        ("0", True, date(1970, 1, 1)),
    ],
)
def test_a_first_day_is_a_date_or_the_utc_day_of_unix_seconds(text: str, seconds: bool, expected: date) -> None:
    assert since_day(text, seconds=seconds) == expected


@pytest.mark.parametrize(
    ("text", "seconds", "message"),
    [
        ("1772409600", False, "is not a date YYYY-MM-DD"),
        ("2026-02-30", True, "not a date of the calendar"),
        ("2026-3-1", False, "is not a date YYYY-MM-DD"),
        ("-1", True, "YYYY-MM-DD or Unix seconds"),
        ("999999999999", True, "past the last day"),
    ],
)
def test_a_bad_first_day_says_what_is_accepted(text: str, seconds: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        since_day(text, seconds=seconds)


def test_day_numbers_count_from_1970() -> None:
    assert day_number(date(1970, 1, 1)) == 0
    assert day_number(date(2026, 1, 1)) == 20454
