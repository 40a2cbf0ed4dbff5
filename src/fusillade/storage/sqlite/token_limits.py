"""The token buckets of the models with `tokens_per_minute`, kept in the process (one process claims on SQLite),
and the estimate of each request they let through, until its result corrects the bucket (`domain.rate_limit`).

A claim of such a model reads its claimable rows as usual, then keeps them in order while the bucket admits
each one's estimate (spending it); the first it does not admit ends the claim of that model, which reports how
long until it would (`Claimed.token_waits`). A request's real usage, when its `Complete` reports one, charges the
bucket the difference from its estimate; a `Release` (never sent) gives the estimate back. A model without a
token limit never comes here: no estimate, no cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from fusillade.domain import ids, models
from fusillade.domain.rate_limit import TokenBucket, estimate_tokens


class _Row(Protocol):
    @property
    def body(self) -> str: ...

    @property
    def url(self) -> str: ...


RowT = TypeVar("RowT", bound=_Row)


class TokenLimits:
    def __init__(self) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.estimates: dict[ids.RequestId, tuple[str, int]] = {}
        """The model and estimate of each request claimed under a token limit and not yet finished."""

    def bucket(self, model: str, per_minute: int, now: float) -> TokenBucket:
        """The bucket of `model` (made full, or with a reloaded rate)."""
        bucket = self.buckets.get(model)
        if bucket is None:
            bucket = self.buckets[model] = TokenBucket.full(per_minute, now)
        elif bucket.per_minute != per_minute:
            bucket.change_rate(per_minute, now)
        return bucket

    def admission(self, model: str, per_minute: int, now: float, claimed: models.Claimed) -> Admission:
        """What decides which of the claimable rows of `model` a claim at `now` (seconds) keeps."""
        return Admission(self, model, self.bucket(model, per_minute, now), now, claimed)

    def correct(self, writes: Sequence[models.RequestWrite], now: float) -> None:
        """Charge the buckets the real usage of completed requests beyond (or short of) their estimates."""
        if not self.estimates:
            return
        for write in writes:
            if isinstance(write, models.MarkProcessing):
                continue
            entry = self.estimates.pop(write.request_id, None)
            if entry is None:
                continue
            model, estimate = entry
            bucket = self.buckets.get(model)
            if bucket is None:
                continue
            if isinstance(write, models.Complete) and write.spend is not None and write.spend.usage is not None:
                bucket.charge(write.spend.usage.total_tokens - estimate, now)
            elif isinstance(write, models.Release):
                bucket.charge(-estimate, now)


@dataclass(slots=True)
class Admission:
    """The claim of one model under a token limit."""

    limits: TokenLimits
    model: str
    bucket: TokenBucket
    now: float
    claim: models.Claimed
    estimates: list[int] = field(default_factory=list)

    def keep(self, rows: list[RowT]) -> list[RowT]:
        """The first rows whose estimates the bucket admits, spent; when one is not, the claim's wait."""
        for index, row in enumerate(rows):
            estimate = estimate_tokens(row.body, row.url)
            if not self.bucket.admits(estimate, self.now):
                self.claim.token_waits = {
                    **self.claim.token_waits,
                    self.model: self.bucket.wait_for(estimate, self.now),
                }
                return rows[:index]
            self.bucket.spend(estimate, self.now)
            self.estimates.append(estimate)
        return rows

    def claimed(self, requests: Sequence[models.ClaimedRequest]) -> None:
        """The requests kept were claimed: remember their estimates for the correction."""
        for request, estimate in zip(requests, self.estimates, strict=True):
            self.limits.estimates[request.id] = (self.model, estimate)
