"""`[server]` maps onto the HTTP server's limits, with the same defaults (`fusillade.api.server.HttpLimits`)."""

from __future__ import annotations

from fusillade.api.server import HttpLimits
from fusillade.composition.http import http_limits
from fusillade.config import ServerSection


def test_the_server_section_defaults_are_the_http_limits_defaults() -> None:
    assert http_limits(ServerSection()) == HttpLimits()


def test_the_server_section_sets_every_limit() -> None:
    section = ServerSection(max_header_bytes="16KiB", max_headers=20, header_timeout="250ms", max_connections=7)
    assert http_limits(section) == HttpLimits(
        max_header_bytes=16 * 1024, max_headers=20, header_timeout=0.25, max_connections=7
    )
