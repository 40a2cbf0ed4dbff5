"""A pool of endpoints serving one model: which endpoint the next call goes to, and which are ejected. Pure: the
caller passes the times (monotonic seconds) and tells the pool how each call went.

- **Choosing.** A call goes to the healthy endpoint with the fewest calls in flight; ties go round robin. An
  ejected endpoint whose cool-down has ended gets the next call as its probe (one probe at a time). When no
  endpoint is healthy, the call still goes out, to the endpoint whose cool-down ends soonest: a pool never
  drops work.
- **Ejection.** An endpoint is ejected when a call finds it unreachable (no connection), or after
  `EjectionPolicy.failure_streak` failures in a row (5xx, timeouts, broken streams); any answer that is not a
  failure (a success, a 4xx, a 429) ends the streak. The cool-down starts at `cool_down` and doubles with each
  ejection in a row, up to `max_cool_down`.
- **Probing back.** A call that succeeds on an ejected endpoint (its probe, or a call sent there because every
  endpoint was ejected) restores it, and its next ejection starts from `cool_down` again; a probe that fails
  ejects it again, for twice as long.

Each endpoint has a `generation`, moved on whenever its state changes (ejected, probed, restored). A call
remembers the generation it was sent in, and a call that ends in another generation says nothing about the
endpoint's health (a long call sent before an ejection, ending after it, neither restores nor ejects again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


class CallHealth(Enum):
    """What a call says of its endpoint's health."""

    ANSWERED = "answered"
    """The endpoint answered (a success, or an HTTP answer other than 5xx)."""
    FAILED = "failed"
    """A 5xx, a timeout or a broken stream: one more failure in a streak."""
    UNREACHABLE = "unreachable"
    """No connection: the endpoint is ejected at once."""
    UNKNOWN = "unknown"
    """The call was never sent, or was aborted: nothing learnt."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectionPolicy:
    failure_streak: int = 3
    """Failures in a row (5xx, timeouts, broken streams) that eject an endpoint."""
    cool_down: float = 10.0
    """Seconds an endpoint stays ejected the first time; doubled with each ejection in a row."""
    max_cool_down: float = 300.0
    """The longest cool-down."""

    def __post_init__(self) -> None:
        if self.failure_streak < 1:
            raise ValueError(f"failure_streak must be at least 1, not {self.failure_streak}.")
        if not 0 < self.cool_down <= self.max_cool_down:
            raise ValueError(
                f"cool_down ({self.cool_down}) must be positive and not above max_cool_down "
                f"({self.max_cool_down})."
            )

    def cool_down_after(self, ejections: int) -> float:
        """The cool-down of the `ejections`-th ejection in a row (1 for the first)."""
        return min(self.cool_down * 2.0 ** min(ejections - 1, 64), self.max_cool_down)


class Endpoint:
    """One endpoint of a pool and what is known of it. Mutated only by its `EndpointPool`."""

    __slots__ = ("address", "ejected_until", "ejections", "failures", "generation", "in_flight", "probing", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.address = address(url)
        """`host:port`: what metrics and `fusillade status` show (never the URL's path: it may hold a secret)."""
        self.in_flight = 0
        self.failures = 0
        """Failures in a row."""
        self.ejections = 0
        """Ejections in a row (no success in between)."""
        self.ejected_until: float | None = None
        """None: healthy."""
        self.probing = False
        """A probe is in flight (the cool-down has ended)."""
        self.generation = 0

    @property
    def healthy(self) -> bool:
        return self.ejected_until is None

    def __repr__(self) -> str:
        state = "healthy" if self.ejected_until is None else f"ejected until {self.ejected_until:.3f}"
        return f"Endpoint({self.url!r}, {state}, in flight {self.in_flight})"


class EndpointPool:
    """The endpoints of one route, what is known of each, and the choice of the next call's endpoint."""

    __slots__ = ("_next", "endpoints")

    def __init__(self, urls: Sequence[str], *, keep: EndpointPool | None = None) -> None:
        """A pool of `urls` (at least one, each once). `keep`: the pool this one replaces (a reloaded routing
        table): its endpoints that stay keep their health and their calls in flight."""
        if not urls:
            raise ValueError("An endpoint pool needs at least one endpoint.")
        if len(set(urls)) != len(urls):
            raise ValueError(f"An endpoint pool lists each endpoint once, not {list(urls)}.")
        kept = {endpoint.url: endpoint for endpoint in keep.endpoints} if keep is not None else {}
        self.endpoints: tuple[Endpoint, ...] = tuple(kept.get(url) or Endpoint(url) for url in urls)
        self._next = 0

    def choose(self, now: float, *, avoid: Endpoint | None = None) -> Endpoint:
        """The endpoint of a call starting now, counted in flight until `finish`. `avoid`: an endpoint that just
        failed this call's request, taken only when no other will do."""
        chosen = self._probe(now, avoid) or self._least_loaded(avoid) or self._least_loaded(None)
        if chosen is None:
            chosen = min(self.endpoints, key=_cool_down_end)
        chosen.in_flight += 1
        return chosen

    def finish(
        self, endpoint: Endpoint, generation: int, health: CallHealth, now: float, policy: EjectionPolicy
    ) -> bool:
        """A call sent to `endpoint` in `generation` ended with `health`; True if that ejected the endpoint."""
        endpoint.in_flight -= 1
        if generation != endpoint.generation:
            return False  # its state changed since the call was sent: the call says nothing of it now
        if health is CallHealth.UNKNOWN:
            if endpoint.probing:  # an aborted probe: the next call probes again
                endpoint.probing = False
                endpoint.generation += 1
            return False
        if health is CallHealth.ANSWERED:
            endpoint.failures = 0
            if endpoint.ejected_until is not None:
                endpoint.ejected_until = None
                endpoint.probing = False
                endpoint.ejections = 0
                endpoint.generation += 1
            return False
        if endpoint.ejected_until is not None and not endpoint.probing:
            return False  # sent while ejected, because every endpoint was: no second ejection
        endpoint.failures += 1
        if health is CallHealth.FAILED and endpoint.failures < policy.failure_streak and not endpoint.probing:
            return False
        endpoint.ejections += 1
        endpoint.ejected_until = now + policy.cool_down_after(endpoint.ejections)
        endpoint.probing = False
        endpoint.failures = 0
        endpoint.generation += 1
        return True

    def all_down(self, now: float) -> bool:
        """Whether every endpoint is ejected and none is due for a probe (or each is being probed)."""
        return all(
            endpoint.ejected_until is not None and (endpoint.ejected_until > now or endpoint.probing)
            for endpoint in self.endpoints
        )

    def has_healthy_besides(self, endpoint: Endpoint) -> bool:
        """Whether a healthy endpoint other than `endpoint` can take a call (a retry elsewhere may start now)."""
        return any(other.ejected_until is None and other is not endpoint for other in self.endpoints)

    # ------------------------------------------------------------------------------------------- helpers

    def _probe(self, now: float, avoid: Endpoint | None) -> Endpoint | None:
        for endpoint in self.endpoints:
            until = endpoint.ejected_until
            if until is not None and until <= now and not endpoint.probing and endpoint is not avoid:
                endpoint.probing = True
                endpoint.generation += 1
                return endpoint
        return None

    def _least_loaded(self, avoid: Endpoint | None) -> Endpoint | None:
        """The healthy endpoint (other than `avoid`) with the fewest calls in flight; ties round robin."""
        endpoints = self.endpoints
        count = len(endpoints)
        best: Endpoint | None = None
        best_index = 0
        start = self._next
        for offset in range(count):
            index = (start + offset) % count
            endpoint = endpoints[index]
            if (
                endpoint.ejected_until is None
                and endpoint is not avoid
                and (best is None or endpoint.in_flight < best.in_flight)
            ):
                best, best_index = endpoint, index
        if best is not None:
            self._next = (best_index + 1) % count
        return best


def _cool_down_end(endpoint: Endpoint) -> float:
    return endpoint.ejected_until if endpoint.ejected_until is not None else 0.0


def address(url: str) -> str:
    """`host:port` of an upstream URL (`[v6]:port` for an IPv6 address), the scheme's port when none is
    written; never its path, which may hold a secret."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        port = 0
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
