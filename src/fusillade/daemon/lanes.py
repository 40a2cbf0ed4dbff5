"""One lane per model: its route (limit, upstream), what this daemon has in flight on it, a pause after the
upstream answered 429, and the slots reserved by claims under way. The tick loop asks the lanes what may start
now; the routing table can be replaced while the daemon runs (a lowered limit lets calls in flight finish and
starts no new ones until below it).

A model whose route is `adaptive` has its limit found by an `AdaptiveLimit` (one per model, the default route's
models each their own), told of every call's outcome by the executor (`succeeded`, `overloaded`).

A model whose route has `requests_per_minute` has a request bucket here too (`domain.rate_limit`): a mirror of
the store's, which holds the limit (shared by every daemon on PostgreSQL). A claim asks for at most the whole
tokens the mirror holds, spends them ahead while it is under way, and the mirror takes the level the store
reported after it (`Claimed.buckets`). A model whose mirror is empty is left out of claims until a tenth of a
second's worth of tokens is back, and `next_resume` wakes the tick then: no polling.

A model whose route has `tokens_per_minute` has its token bucket in the store alone (SQLite: the process), as
only the claim sees the requests' estimates; when it stops a claim before a request it does not hold, the claim
says how long until it does (`Claimed.token_waits`) and the lane pauses until then."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from fusillade.domain import models
from fusillade.domain.adaptive_limit import AdaptiveLimit
from fusillade.domain.rate_limit import TokenBucket
from fusillade.upstream.routes import Route


class Lanes:
    def __init__(self, routes: Mapping[str, Route], default: Route | None = None) -> None:
        self._routes = dict(routes)
        self._default = default
        self._learnt: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._reserved: Counter[str] = Counter()
        """Slots asked for by claims under way."""
        self._owners: Counter[str] = Counter()
        self._paused_until: dict[str, float] = {}
        self._adaptive: dict[str, AdaptiveLimit] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.any_rated = False
        """Whether any route has a rate limit (the tick loop tells the lanes of claims' tokens only then)."""
        self._keep_what_stays()

    # ------------------------------------------------------------------------------------------- routes

    def replace_routes(self, routes: Mapping[str, Route], default: Route | None = None) -> None:
        self._routes = dict(routes)
        self._default = default
        if default is None:
            self._learnt.clear()
        self._keep_what_stays()

    def _keep_what_stays(self) -> None:
        """Keep the adaptive limits of the models whose route is still adaptive (within its new bounds) and the
        buckets of those whose route still has a request rate."""
        for model, limit in list(self._adaptive.items()):
            route = self.route(model)
            if route is None or not route.adaptive:
                del self._adaptive[model]
            else:
                limit.bound(route.min_concurrency, route.concurrency)
        for model in list(self._buckets):
            route = self.route(model)
            if route is None or route.requests_per_minute is None:
                del self._buckets[model]
        self.any_rated = any(
            route.requests_per_minute or route.tokens_per_minute for route in self._routes.values()
        ) or bool(self._default and (self._default.requests_per_minute or self._default.tokens_per_minute))

    @property
    def has_default(self) -> bool:
        return self._default is not None

    def learn(self, pending_models: Iterable[str]) -> bool:
        """With a default route, give a lane to every model that has pending requests and no route of its own
        (and drop learnt lanes with nothing pending or in flight). True if a lane was added."""
        if self._default is None:
            return False
        current = {model for model in pending_models if model not in self._routes}
        current.update(model for model in self._learnt if self._in_flight[model])
        added = bool(current - self._learnt)
        self._learnt = current
        return added

    def route(self, model: str) -> Route | None:
        route = self._routes.get(model)
        if route is None and model in self._learnt:
            return self._default
        return route

    @property
    def model_names(self) -> list[str]:
        return [*self._routes, *sorted(self._learnt - self._routes.keys())]

    # ------------------------------------------------------------------------------------------ capacity

    def capacities(self, now: float) -> list[models.ModelCapacity]:
        """What may start now (monotonic `now`), per model with free slots, no pause and, with a rate limit,
        tokens in its bucket."""
        for bucket in self._buckets.values():
            bucket.spend(0, now)  # refilled to now: a bucket the tick woke for is no longer due (`next_resume`)
        result = []
        for model in self.model_names:
            route = self.route(model)
            assert route is not None
            paused_until = self._paused_until.get(model)
            if paused_until is not None:
                if paused_until > now:
                    continue
                del self._paused_until[model]
            limit = self._limit(model, route)
            free = limit - self._in_flight[model] - self._reserved[model]
            if route.requests_per_minute is not None and free > 0:
                free = min(free, self._bucket(model, route.requests_per_minute, now).available(now))
            if free > 0:
                result.append(
                    models.ModelCapacity(
                        model=model,
                        free=free,
                        limit=limit,
                        requests_per_minute=route.requests_per_minute,
                        tokens_per_minute=route.tokens_per_minute,
                    )
                )
        return result

    def _limit(self, model: str, route: Route) -> int:
        if not route.adaptive:
            return route.concurrency
        adaptive = self._adaptive.get(model)
        if adaptive is None:
            adaptive = self._adaptive[model] = AdaptiveLimit(route.min_concurrency, route.concurrency)
        return adaptive.limit

    def limits(self) -> dict[str, int]:
        """The limit of each model's lane now."""
        result = {}
        for model in self.model_names:
            route = self.route(model)
            if route is not None:
                result[model] = self._limit(model, route)
        return result

    # ------------------------------------------------------------------------------------ adaptive limits

    def succeeded(self, model: str, *, sent_at: float, in_flight: int, now: float) -> bool:
        """A call of `model` sent at `sent_at` (monotonic) with `in_flight` calls in flight succeeded; True if
        its limit was cut (the upstream is queueing)."""
        adaptive = self._adaptive.get(model)
        return adaptive is not None and adaptive.succeeded(
            sent_at=sent_at, in_flight=in_flight, latency=now - sent_at, now=now
        )

    def overloaded(self, model: str, *, sent_at: float, now: float) -> bool:
        """A call of `model` sent at `sent_at` was refused for overload; True if its limit was cut."""
        adaptive = self._adaptive.get(model)
        return adaptive is not None and adaptive.overloaded(sent_at=sent_at, now=now)

    def is_adaptive(self, model: str) -> bool:
        return model in self._adaptive

    def next_resume(self) -> float | None:
        """When the earliest pause ends or an empty request bucket has tokens again (monotonic), if any."""
        resume = min(self._paused_until.values(), default=None)
        for bucket in self._buckets.values():
            if (refill := bucket.refilled_at(max(1, bucket.capacity // 5))) is not None:
                resume = refill if resume is None else min(resume, refill)
        return resume

    def pause(self, model: str, until: float) -> bool:
        """Pause a model's lane until `until` (monotonic); a later pause extends it. True if it was extended."""
        if self._paused_until.get(model, 0.0) >= until:
            return False
        self._paused_until[model] = until
        return True

    # ------------------------------------------------------------------------------------------ rate limits

    def _bucket(self, model: str, per_minute: int, now: float) -> TokenBucket:
        bucket = self._buckets.get(model)
        if bucket is None:
            bucket = self._buckets[model] = TokenBucket.full(per_minute, now)
        elif bucket.per_minute != per_minute:
            bucket.change_rate(per_minute, now)
        return bucket

    def spend_ahead(self, capacities: Iterable[models.ModelCapacity], now: float) -> None:
        """A claim asks for these: spend their tokens until its answer, so that no other claim asks for them."""
        for capacity in capacities:
            if capacity.requests_per_minute is not None and (bucket := self._buckets.get(capacity.model)):
                bucket.spend(capacity.free, now)

    def claim_answered(
        self, capacities: Iterable[models.ModelCapacity], claimed: models.Claimed | None, now: float
    ) -> None:
        """The claim that asked for `capacities` took `claimed` (None: it failed): give back the tokens spent
        ahead, then take the level the store reported, or spend what was claimed; pause the lanes whose token
        bucket stopped the claim."""
        if claimed is not None:
            for model, wait in claimed.token_waits.items():
                self.pause(model, now + wait)
        for capacity in capacities:
            if capacity.requests_per_minute is None or (bucket := self._buckets.get(capacity.model)) is None:
                continue
            bucket.refund(capacity.free, now)
            if claimed is None:
                continue
            level = claimed.buckets.get(capacity.model)
            if level is not None:
                bucket.set_level(level, now)
            else:
                bucket.spend(sum(1 for request in claimed if request.model == capacity.model), now)

    # ------------------------------------------------------------------------------------------ in flight

    def reserve(self, capacities: Iterable[models.ModelCapacity]) -> None:
        """Hold the slots a claim asks for until its answer (`unreserve`), so that no other claim takes them."""
        for capacity in capacities:
            self._reserved[capacity.model] += capacity.free

    def unreserve(self, capacities: Iterable[models.ModelCapacity]) -> None:
        for capacity in capacities:
            self._reserved[capacity.model] -= capacity.free
            if self._reserved[capacity.model] <= 0:
                del self._reserved[capacity.model]

    def started(self, request: models.ClaimedRequest) -> None:
        self._in_flight[request.model] += 1
        self._owners[request.owner] += 1

    def finished(self, request: models.ClaimedRequest) -> None:
        for counter, key in ((self._in_flight, request.model), (self._owners, request.owner)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def in_flight(self, model: str | None = None) -> int:
        if model is None:
            return sum(self._in_flight.values())
        return self._in_flight[model]

    def models_in_flight(self) -> dict[str, int]:
        return dict(self._in_flight)

    def owners_in_flight(self) -> dict[str, int]:
        return dict(self._owners)
