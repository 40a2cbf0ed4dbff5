"""Pricing from the configuration (`[models."NAME".pricing]`) and the cost of a batch's usage (`Prices`)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from fusillade.config import InvalidConfiguration, load_config
from fusillade.domain import ids, models
from fusillade.domain.prices import NO_PRICES, Prices
from fusillade.domain.usage import Cost, Pricing, Usage
from tests.unit.config_files import write

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def batch(model: str | None, *usage: models.ModelUsage) -> models.Batch:
    return models.Batch(
        id=ids.new_batch_id(),
        owner="alice",
        input_file_id=ids.new_file_id(),
        output_file_id=ids.new_file_id(),
        error_file_id=ids.new_file_id(),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=None,
        created_at=NOW,
        expires_at=NOW,
        model=model,
        usage=usage,
    )


def used(model: str, usage: Usage, unknown: int = 0) -> models.ModelUsage:
    return models.ModelUsage(model=model, requests=1, unknown=unknown, usage=usage)


def test_the_configuration_prices_each_route_and_the_default_route(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [models.priced]
            base_url = "http://127.0.0.1:9000/v1"
            pricing = { input = 0.15, cached_input = 0.075, output = 0.6 }
            [models.free]
            base_url = "http://127.0.0.1:9000/v1"
            [models."*"]
            base_url = "http://127.0.0.1:9001/v1"
            pricing = { input = "2", output = 8 }
            """,
        )
    )
    prices = config.prices()
    assert prices.of("priced") == Pricing(Decimal("0.15"), Decimal("0.075"), Decimal("0.6"))
    assert prices.of("free") is None  # a route of its own, without pricing: not the default route's
    assert prices.of("anything-else") == Pricing(Decimal(2), Decimal(2), Decimal(8))


def test_a_negative_price_is_refused_with_its_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [models.m]
        base_url = "http://127.0.0.1:9000/v1"
        pricing = { input = -1, output = 1 }
        """,
    )
    with pytest.raises(InvalidConfiguration) as caught:
        load_config(path)
    assert "models.m.pricing.input" in str(caught.value)


def test_a_batch_costs_the_sum_of_its_models_at_their_prices() -> None:
    prices = Prices(
        routed={
            "a": Pricing.per_million(input=1, output=2, cached_input="0.5"),
            "b": Pricing.per_million(input=3, output=4),
        }
    )
    cost = prices.batch_cost(
        batch(
            None,
            used("a", Usage(input_tokens=1_000_000, cached_tokens=500_000, output_tokens=10)),
            used("b", Usage(input_tokens=7, output_tokens=1)),
        )
    )
    # a: 500k uncached at 1 + 500k cached at 0.5 = 0.75; 10 out at 2 = 0.00002. b: 7 x 3 = 0.000021; 1 x 4.
    assert cost == Cost(input=Decimal("0.750021"), output=Decimal("0.000024"))


def test_a_cost_is_unknown_when_a_model_used_has_no_price() -> None:
    prices = Prices(routed={"a": Pricing.per_million(input=1, output=1), "b": None})
    assert prices.batch_cost(batch(None, used("a", Usage(1, 0, 1, 0)), used("b", Usage(1, 0, 1, 0)))) is None
    assert prices.batch_cost(batch("b")) is None  # nothing used yet, and its model has no price
    assert prices.batch_cost(batch("a")) == Cost(Decimal(0), Decimal(0))
    assert NO_PRICES.batch_cost(batch("a", used("a", Usage(1, 0, 1, 0)))) is None  # nothing priced at all
