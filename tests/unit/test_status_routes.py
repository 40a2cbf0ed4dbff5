"""The routes table of `fusillade status`: an upstream shown as host and port only, the default route last with
what is in flight for the models without a route of their own."""

from __future__ import annotations

import pytest

from fusillade.cli.status import RouteRow, route_rows, upstream_address
from fusillade.config import Config, RouteSection


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://api.openai.com/v1", "api.openai.com:443"),
        ("http://10.0.0.5:8000/tenant/sk-secret-in-path/v1", "10.0.0.5:8000"),
        ("http://[::1]:9000/v1", "[::1]:9000"),
        ("http://upstream.internal", "upstream.internal:80"),
    ],
)
def test_an_upstream_is_shown_as_its_host_and_port(url: str, shown: str) -> None:
    assert upstream_address(url) == shown


def test_routes_in_model_order_then_the_default_route_with_the_rest_in_flight() -> None:
    config = Config(
        models={
            "b": RouteSection(base_url="http://b.internal:8001/v1", concurrency=4),
            "a": RouteSection(base_url="https://a.internal/v1"),
            "*": RouteSection(base_url="http://default.internal:9000", concurrency=2),
        }
    )

    rows = route_rows(config, {"a": 3, "unlisted-1": 2, "unlisted-2": 1})

    assert rows == [
        RouteRow("a", "a.internal:443", 16, 3),
        RouteRow("b", "b.internal:8001", 4, 0),
        RouteRow("*", "default.internal:9000", 2, 3),
    ]
    assert route_rows(Config(), {"orphan": 1}) == []
    default_only = Config(default_route=RouteSection(base_url="http://d:1"))
    assert route_rows(default_only, {"orphan": 1}) == [RouteRow("*", "d:1", 16, 1)]


def test_an_adaptive_route_shows_its_bounds_and_the_limits_the_running_daemons_reported() -> None:
    config = Config(
        models={
            "fixed": RouteSection(base_url="http://f:1", concurrency=4),
            "vllm": RouteSection(base_url="http://v:1", concurrency=64, adaptive=True, min_concurrency=2),
        }
    )

    rows = route_rows(config, {"vllm": 9}, {"vllm": [9, 12], "fixed": [4]})

    assert rows == [
        RouteRow("fixed", "f:1", 4, 0),
        RouteRow("vllm", "v:1", 64, 9, min_concurrency=2, limits_now=(9, 12)),
    ]


def test_a_floor_above_the_ceiling_is_refused() -> None:
    with pytest.raises(ValueError, match="min_concurrency"):
        RouteSection(base_url="http://v:1", concurrency=4, adaptive=True, min_concurrency=8)


def test_a_pool_shows_each_endpoint_as_its_host_and_port() -> None:
    config = Config(
        models={
            "pool": RouteSection(
                base_url=["http://a.internal:8000/v1", "http://b.internal:8000/secret-path/v1"], concurrency=8
            )
        },
        default_route=RouteSection(base_url=["http://c:1", "http://d:2"]),
    )

    rows = route_rows(config, {"pool": 5})

    assert rows == [
        RouteRow("pool", "a.internal:8000, b.internal:8000", 8, 5),
        RouteRow("*", "c:1, d:2", 16, 0),
    ]
