"""Reliability tier: real processes (daemons, the API, the fake upstream, throwaway PostgreSQL clusters) killed,
restarted and starved over loopback, with assertions on the database and on the fake upstream's own records.

Sizes: every scenario has a CI size (the whole tier stays within a few minutes on 2 cores) and a bigger one
under `pytest --long` (see `scale`). `docs/reliability.md` records what the latest runs measured."""

from __future__ import annotations

from typing import TypeVar

import pytest

T = TypeVar("T")

LONG = False
"""True under `pytest --long`, set before the tier's modules are imported: for sizes fixed at import time
(hypothesis settings); tests otherwise take the `scale` fixture."""


def pytest_configure(config: pytest.Config) -> None:
    global LONG
    LONG = bool(config.getoption("--long"))


class Scale:
    """`scale(ci_size, long_size)`: the size of this run (`long` under `pytest --long`)."""

    def __init__(self, long: bool) -> None:
        self.long = long

    def __call__(self, short: T, long: T) -> T:
        return long if self.long else short


@pytest.fixture
def scale(request: pytest.FixtureRequest) -> Scale:
    return Scale(bool(request.config.getoption("--long")))
