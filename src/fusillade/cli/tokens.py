"""How the CLI writes a batch's token usage and cost (`fusillade run`'s summary, `fusillade status`'s table).

Costs are computed exactly (`domain.usage.cost`) and rounded only here, for reading: 2 decimals from one dollar
up (`$1,234.57`), 3 significant digits below (`$0.0123`, `$0.000015`), never fewer than 2 decimals (`$0.50`)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from fusillade.domain import models
from fusillade.domain.prices import Prices

_CENT = Decimal("0.01")


def usd(amount: Decimal) -> str:
    """An amount of US dollars, rounded for reading (see the module docstring)."""
    if amount >= 1 or amount == 0:
        return f"${amount.quantize(_CENT, ROUND_HALF_UP):,}"
    decimals = max(2, 2 - amount.adjusted())
    text = f"{amount.quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP):f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"${whole}.{fraction}"


def summary(batch: models.Batch, prices: Prices) -> str | None:
    """`tokens: 1,234 in (56 cached), 789 out (12 reasoning); cost $0.0123; usage unknown for 3 requests`: the
    cost when every model of the batch is priced, the last part when some completed request reported no usage.
    None before any request completed."""
    if not batch.usage:
        return None
    usage = batch.total_usage
    parts = [
        f"tokens: {usage.input_tokens:,} in ({usage.cached_tokens:,} cached), "
        f"{usage.output_tokens:,} out ({usage.reasoning_tokens:,} reasoning)"
    ]
    cost = prices.batch_cost(batch)
    if cost is not None:
        parts.append(f"cost {usd(cost.total)}")
    if batch.usage_unknown:
        parts.append(f"usage unknown for {batch.usage_unknown:,} request{'s' if batch.usage_unknown != 1 else ''}")
    return "; ".join(parts)


def total(batch: models.Batch) -> str:
    """The batch's total tokens for a table cell, with the completed requests that reported no usage:
    `2,023`, `2,023 (3 unknown)`."""
    text = f"{batch.total_usage.total_tokens:,}"
    return f"{text} ({batch.usage_unknown:,} unknown)" if batch.usage_unknown else text


def cost_cell(batch: models.Batch, prices: Prices) -> str:
    """The batch's cost for a table cell; `-` when a model of the batch has no pricing."""
    cost = prices.batch_cost(batch)
    return "-" if cost is None else usd(cost.total)
