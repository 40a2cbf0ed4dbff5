"""The endpoint pools of the routes that list several endpoints (`Route.base_urls`): one
`domain.endpoint_pool.EndpointPool` per route, keyed as the route's metrics label: a model with a route of its
own by its name, every model of the default route together as `*` (the same servers, whatever the model: they
share its health and its calls in flight, and memory does not grow with the models tenants name). A pool is
made on its first call and made again, keeping the health and the calls in flight of the endpoints that stay,
when its route changes (a reloaded routing table). Routes of one endpoint never come here.

A request whose call failed because of its endpoint (no connection, 5xx, timeout, broken stream) while another
endpoint of the pool is healthy is retried elsewhere: the executor reschedules it without a backoff, and its
next call avoids the endpoint that failed it (a hint held here, in this daemon only)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

from fusillade.domain import ids
from fusillade.domain.endpoint_pool import CallHealth, EjectionPolicy, Endpoint, EndpointPool
from fusillade.upstream import outcome as outcomes
from fusillade.upstream.classify import CONNECTION_ERROR, STREAM_ERROR, TIMEOUT
from fusillade.upstream.routes import Route

MAX_AVOID_HINTS = 10_000
"""Hints of requests retried elsewhere are dropped past this many (a request claimed by another daemon never
takes its hint)."""
_CONNECT_TIMEOUT = "connect timeout"


class Chosen(NamedTuple):
    """The pool (its key), the endpoint a call goes to, the generation it was sent in, and the route to send it
    with."""

    key: str
    endpoint: Endpoint
    generation: int
    route: Route


@dataclass(slots=True)
class _Pool:
    route: Route
    endpoints: EndpointPool
    routes: dict[str, Route] = field(default_factory=dict)
    """Each endpoint's route of one endpoint, made once."""


class EndpointPools:
    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self._avoid: dict[ids.RequestId, Endpoint] = {}

    def choose(self, key: str, route: Route, now: float, request_id: ids.RequestId) -> Chosen:
        """The endpoint of a call on the pool `key` (its route: `route`) starting now (monotonic), counted in
        flight until `finish`."""
        pool = self._pools.get(key)
        if pool is None or pool.route is not route:
            pool = self._pools[key] = _new_pool(route, pool)
        avoid = self._avoid.pop(request_id, None) if self._avoid else None
        endpoint = pool.endpoints.choose(now, avoid=avoid)
        return Chosen(key, endpoint, endpoint.generation, pool.routes[endpoint.url])

    def finish(self, chosen: Chosen, health: CallHealth, now: float, policy: EjectionPolicy) -> bool:
        """The call ended with `health`; True if that ejected its endpoint."""
        pool = self._pools.get(chosen.key)
        if pool is None or chosen.endpoint not in pool.endpoints.endpoints:
            chosen.endpoint.in_flight -= 1  # the endpoint left the pool (a reload) while the call ran
            return False
        return pool.endpoints.finish(chosen.endpoint, chosen.generation, health, now, policy)

    def all_down(self, key: str, now: float) -> bool:
        """Whether every endpoint of the pool `key` is ejected with no probe due (False for a pool not seen)."""
        pool = self._pools.get(key)
        return pool is not None and pool.endpoints.all_down(now)

    def retry_elsewhere(self, chosen: Chosen, request_id: ids.RequestId) -> bool:
        """Whether the request of a call its endpoint failed may be retried at once on another endpoint (one is
        healthy); if so its next call in this daemon avoids the endpoint that failed it."""
        pool = self._pools.get(chosen.key)
        if pool is None or not pool.endpoints.has_healthy_besides(chosen.endpoint):
            return False
        if len(self._avoid) >= MAX_AVOID_HINTS:
            self._avoid.clear()
        self._avoid[request_id] = chosen.endpoint
        return True

    def forget_others(self, keys: set[str]) -> None:
        """Drop the pools whose key is not in `keys` (their route changed to one endpoint, or left)."""
        for key in [key for key in self._pools if key not in keys]:
            del self._pools[key]

    def in_flight(self) -> Counter[tuple[str, str]]:
        """Calls in flight per (pool key, endpoint address)."""
        counts: Counter[tuple[str, str]] = Counter()
        for model, pool in self._pools.items():
            for endpoint in pool.endpoints.endpoints:
                counts[model, endpoint.address] += endpoint.in_flight
        return counts

    def ejected(self) -> Counter[tuple[str, str]]:
        """1 per (pool key, endpoint address) ejected now, 0 for the others."""
        counts: Counter[tuple[str, str]] = Counter()
        for model, pool in self._pools.items():
            for endpoint in pool.endpoints.endpoints:
                counts[model, endpoint.address] += 0 if endpoint.healthy else 1
        return counts


def _new_pool(route: Route, previous: _Pool | None) -> _Pool:
    endpoints = EndpointPool(route.base_urls, keep=None if previous is None else previous.endpoints)
    return _Pool(route, endpoints, {url: route.endpoint_route(url) for url in route.base_urls})


def call_health(result: outcomes.Outcome) -> CallHealth:
    """What an outcome says of the endpoint that gave it."""
    if isinstance(result, outcomes.Success):
        return CallHealth.ANSWERED
    if isinstance(result, outcomes.Retriable):
        if result.code == CONNECTION_ERROR:
            return CallHealth.UNREACHABLE
        if result.code == TIMEOUT and result.message.startswith(_CONNECT_TIMEOUT):
            return CallHealth.UNREACHABLE
        if result.status_code is not None:
            return CallHealth.FAILED if result.status_code >= 500 else CallHealth.ANSWERED
        return CallHealth.FAILED if result.code in (TIMEOUT, STREAM_ERROR) else CallHealth.ANSWERED
    # Permanent: an HTTP answer, or an error the upstream embedded in one; else the request was never sent.
    return CallHealth.ANSWERED if result.status_code is not None or result.body is not None else CallHealth.UNKNOWN


def ejection_policy(cool_down: timedelta, max_cool_down: timedelta) -> EjectionPolicy:
    return EjectionPolicy(cool_down=cool_down.total_seconds(), max_cool_down=max_cool_down.total_seconds())
