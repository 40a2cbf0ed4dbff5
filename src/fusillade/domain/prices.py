"""The prices in force, from the configuration's `[models."NAME".pricing]` tables, and the cost of a batch's usage.

A model with a route of its own has that route's pricing (or none); any other model has the default route's.
A cost is given only when it is exact for what was reported: `None` (unknown) when a model of the batch has no
pricing. Requests whose response carried no usage cost nothing here: they are counted apart
(`Batch.usage_unknown`), never guessed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fusillade.domain.usage import NO_COST, Cost, Pricing, cost

if TYPE_CHECKING:
    from fusillade.domain import models


@dataclass(frozen=True, slots=True)
class Prices:
    routed: Mapping[str, Pricing | None] = field(default_factory=dict)
    """Every model with a route of its own, and that route's pricing (None: not priced)."""
    default: Pricing | None = None
    """The default route's pricing: of every model without a route of its own."""

    @property
    def configured(self) -> bool:
        """Whether any model is priced."""
        return self.default is not None or any(pricing is not None for pricing in self.routed.values())

    def of(self, model: str) -> Pricing | None:
        return self.routed.get(model, self.default)

    def batch_cost(self, batch: models.Batch) -> Cost | None:
        """What the batch's reported usage cost; None when a model it used (or, before any usage, the model it
        names) has no pricing, or nothing is priced at all."""
        if not self.configured:
            return None
        if not batch.usage:
            return NO_COST if batch.model is None or self.of(batch.model) is not None else None
        return self.usage_cost(batch.usage)

    def usage_cost(self, usage: Sequence[models.ModelUsage]) -> Cost | None:
        """The cost of usage by model; None when one of the models has no pricing."""
        total = NO_COST
        for model in usage:
            pricing = self.of(model.model)
            if pricing is None:
                return None
            total += cost(model.usage, pricing)
        return total


NO_PRICES = Prices()
