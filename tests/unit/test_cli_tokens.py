"""How the CLI writes a batch's tokens and cost (`cli.tokens`): `fusillade run`'s summary line, the cells of
`fusillade status`, and dollar amounts rounded for reading."""

from __future__ import annotations

from decimal import Decimal

import pytest

from fusillade.cli import tokens
from fusillade.domain.prices import NO_PRICES, Prices
from fusillade.domain.usage import Pricing, Usage
from tests.unit.test_prices import batch, used

PRICES = Prices(routed={"gpt-4o": Pricing.per_million(input=2.5, cached_input=1.25, output=10), "free": None})


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("0", "$0.00"),
        ("0.5", "$0.50"),
        ("0.0123456", "$0.0123"),
        ("0.000015", "$0.000015"),
        ("0.1234", "$0.123"),
        ("0.0009996", "$0.001"),
        ("0.9996", "$1.00"),
        ("1", "$1.00"),
        ("1234.565", "$1,234.57"),
        ("12345678.9", "$12,345,678.90"),
    ],
)
def test_amounts_are_rounded_for_reading(amount: str, shown: str) -> None:
    assert tokens.usd(Decimal(amount)) == shown


def test_the_summary_gives_the_tokens_and_the_cost_of_a_priced_batch() -> None:
    usage = Usage(input_tokens=1_234_000, cached_tokens=56_000, output_tokens=789, reasoning_tokens=12)
    priced = batch("gpt-4o", used("gpt-4o", usage))
    # 1,178,000 x 2.5 + 56,000 x 1.25 + 789 x 10, per million: 2.945 + 0.07 + 0.00789
    assert tokens.summary(priced, PRICES) == (
        "tokens: 1,234,000 in (56,000 cached), 789 out (12 reasoning); cost $3.02"
    )
    assert tokens.total(priced) == "1,234,789"
    assert tokens.cost_cell(priced, PRICES) == "$3.02"


def test_the_summary_has_no_cost_when_a_model_is_not_priced() -> None:
    mixed = batch(None, used("gpt-4o", Usage(10, 0, 5, 0)), used("free", Usage(3, 1, 2, 0)))
    assert tokens.summary(mixed, PRICES) == "tokens: 13 in (1 cached), 7 out (0 reasoning)"
    assert tokens.summary(mixed, NO_PRICES) == "tokens: 13 in (1 cached), 7 out (0 reasoning)"
    assert tokens.cost_cell(mixed, PRICES) == "-"


def test_requests_without_usage_are_counted_apart() -> None:
    one = batch("gpt-4o", used("gpt-4o", Usage(input_tokens=40, output_tokens=10), unknown=1))
    assert tokens.summary(one, NO_PRICES) == (
        "tokens: 40 in (0 cached), 10 out (0 reasoning); usage unknown for 1 request"
    )
    assert tokens.total(one) == "50 (1 unknown)"
    several = batch("gpt-4o", used("gpt-4o", Usage(), unknown=1_200))
    assert tokens.summary(several, PRICES) == (
        "tokens: 0 in (0 cached), 0 out (0 reasoning); cost $0.00; usage unknown for 1,200 requests"
    )


def test_no_summary_before_a_request_completed() -> None:
    assert tokens.summary(batch("gpt-4o"), PRICES) is None
    assert tokens.total(batch("gpt-4o")) == "0"
