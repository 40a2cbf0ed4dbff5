"""The routing table in force in a process, and the models it serves (what an upload accepts, what
`/v1/models` lists, what a message about a model without a route names)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from fusillade.config import DEFAULT_ROUTE_MODEL, Config, RouteSection
from fusillade.domain.served import ServedModels
from fusillade.upstream.routes import Route

MOCK_UPSTREAM_CONCURRENCY = 64
"""Limit of the route to the fake upstream of `fusillade serve --mock-upstream`."""


class Routing:
    """The routing table in force in a process: the configuration's routes with their keys read, and the
    default route for models without one of their own (the daemon learns those models from the queue)."""

    def __init__(self, config: Config) -> None:
        self.on_change: Callable[[Mapping[str, Route], Route | None], None] | None = None
        """Called with the new table and default route whenever they change (the daemon's `replace_routes`)."""
        self._routes, self._default = _resolve(config)

    @property
    def routes(self) -> dict[str, Route]:
        """The models with a route of their own."""
        return dict(self._routes)

    @property
    def default(self) -> Route | None:
        return self._default

    def accepts(self, model: str) -> bool:
        """Whether requests for `model` can be sent somewhere (an upload checks this for every line)."""
        return model in self._routes or self._default is not None

    def replace(self, config: Config) -> None:
        """Use a new configuration (a reload); raises `InvalidConfiguration` (and keeps the old one) when a
        route's key variable is not set."""
        self._routes, self._default = _resolve(config)
        if self.on_change is not None:
            self.on_change(self.routes, self._default)


def served_models(config: Config, *, previous: ServedModels | None = None) -> ServedModels:
    """The models `config` serves (reads no secret): each model with a route of its own, since now or since
    `previous` had it, and whether a default route takes the others. `served_models(config).describe()` is
    `served models: a, b, c (and 4 more)`, the list a no-route message gives."""
    names = [name for name in config.models if name != DEFAULT_ROUTE_MODEL]
    # No model is called "" (model names are not empty): only the default route routes it.
    return ServedModels.of(names, default_route=config.has_route(""), now=datetime.now(UTC), previous=previous)


def _resolve(config: Config) -> tuple[dict[str, Route], Route | None]:
    """The listed models' routes and the default route (or None), keys read from the environment."""
    # No model is called "" (model names are not empty), so route_for("") is the default route, or None.
    return config.resolve_routes(), config.route_for("")


def with_mock_upstream(config: Config, *, url: str) -> Config:
    """`config` with every model that has no route of its own sent to the fake upstream at `url`."""
    route = RouteSection(base_url=url, concurrency=MOCK_UPSTREAM_CONCURRENCY)
    return config.model_copy(update={"default_route": route})


def no_overlay(config: Config) -> Config:
    """`config` unchanged: the overlay of a process without a fake upstream."""
    return config
