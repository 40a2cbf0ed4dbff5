"""The token usage of a group of applied `Complete` writes, summed per batch, owner and model: what each backend
adds to its `batch_usage` rows in the transaction of those writes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fusillade.domain import ids, models
from fusillade.domain.usage import Usage


@dataclass(slots=True)
class UsageSum:
    batch_id: ids.BatchId
    owner: str
    model: str
    requests: int = 0
    """Completed requests whose usage is known (summed in the token counts)."""
    unknown: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, usage: Usage | None) -> None:
        if usage is None:
            self.unknown += 1
            return
        self.requests += 1
        self.input_tokens += usage.input_tokens
        self.cached_tokens += usage.cached_tokens
        self.output_tokens += usage.output_tokens
        self.reasoning_tokens += usage.reasoning_tokens


def usage_sums(writes: Iterable[models.RequestWrite]) -> list[UsageSum]:
    """The sums of the `Complete` writes among `writes` that carry a `Spend` (every one of `writes` applied)."""
    sums: dict[tuple[ids.BatchId, str, str], UsageSum] = {}
    for write in writes:
        if type(write) is not models.Complete or write.spend is None:
            continue
        spend = write.spend
        key = (spend.batch_id, spend.owner, spend.model)
        found = sums.get(key)
        if found is None:
            found = sums[key] = UsageSum(spend.batch_id, spend.owner, spend.model)
        found.add(spend.usage)
    return list(sums.values())
