"""A batch's budget as both backends store it: one JSON document on the batch row, with the pricing of each model
of the batch fixed at its creation.

    {"max_total_tokens": 100000 | null, "max_cost": "2.50" | null,
     "prices": {"MODEL": ["INPUT", "CACHED_INPUT", "OUTPUT"], ...}}   (USD per million tokens, decimal strings)

PostgreSQL's write statement reads the same document (`storage/postgres/fenced_writes.py`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from fusillade import errors
from fusillade.domain import models
from fusillade.domain.usage import Pricing


def resolved(spec: models.BatchSpec, batch_models: Iterable[str]) -> models.Budget | None:
    """The spec's budget with the pricing of each of `batch_models` (the models of its input file), or
    `ValidationError` when `max_cost` is set and one of them has no pricing."""
    budget = spec.budget
    if budget is None:
        return None
    prices: dict[str, Pricing] = {}
    for model in sorted(set(batch_models)):
        pricing = spec.prices.of(model)
        if pricing is not None:
            prices[model] = pricing
        elif budget.max_cost is not None:
            raise errors.ValidationError(
                f"budget.max_cost: model {model!r} of the input file has no pricing, so its cost is unknown; set "
                f'[models."{model}".pricing] in the configuration, or use budget.max_total_tokens.'
            )
    return dataclasses.replace(budget, prices=prices)


def document(budget: models.Budget) -> dict[str, Any]:
    return {
        "max_total_tokens": budget.max_total_tokens,
        "max_cost": None if budget.max_cost is None else str(budget.max_cost),
        "prices": {
            model: [str(pricing.input), str(pricing.cached_input), str(pricing.output)]
            for model, pricing in budget.prices.items()
        },
    }


def from_document(stored: Mapping[str, Any] | None) -> models.Budget | None:
    if stored is None:
        return None
    max_cost = stored.get("max_cost")
    return models.Budget(
        max_total_tokens=stored.get("max_total_tokens"),
        max_cost=None if max_cost is None else Decimal(max_cost),
        prices={
            model: Pricing(Decimal(values[0]), Decimal(values[1]), Decimal(values[2]))
            for model, values in (stored.get("prices") or {}).items()
        },
    )
