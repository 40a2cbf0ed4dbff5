"""`tokens_per_minute` in the configuration: a positive count, carried to the route, refused on PostgreSQL
(no shared token bucket there yet); and the lanes' pause when a claim's token bucket stopped it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusillade.config import InvalidConfiguration, load_config
from fusillade.daemon.lanes import Lanes
from fusillade.domain import models
from fusillade.upstream.routes import Route
from tests.unit.config_files import ROUTE, write


def test_tokens_per_minute_reaches_the_route_and_the_lanes_claims(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ROUTE + "tokens_per_minute = 90000\n"), environ={})
    route = config.resolve_routes({})["m"]
    assert route.tokens_per_minute == 90_000
    lanes = Lanes({"m": route})
    assert lanes.any_rated
    (capacity,) = lanes.capacities(0.0)
    assert (capacity.tokens_per_minute, capacity.requests_per_minute) == (90_000, None)


def test_tokens_per_minute_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfiguration) as raised:
        load_config(write(tmp_path, ROUTE + "tokens_per_minute = 0\n"), environ={})
    assert "must be at least 1" in str(raised.value)


@pytest.mark.parametrize("table", ["[models.m]", "[default_route]"])
def test_tokens_per_minute_is_refused_on_postgresql(tmp_path: Path, table: str) -> None:
    text = f'database_url = "postgresql://db/f"\n{table}\nbase_url = "http://h/v1"\ntokens_per_minute = 9000\n'
    with pytest.raises(InvalidConfiguration) as raised:
        load_config(write(tmp_path, text), environ={})
    assert "token limits are held on SQLite only" in str(raised.value)
    fine = 'database_url = "postgresql://db/f"\n[models.m]\nbase_url = "http://h/v1"\nrequests_per_minute = 9\n'
    assert load_config(write(tmp_path, fine), environ={}).models["m"].requests_per_minute == 9


def test_a_claim_stopped_by_the_token_bucket_pauses_the_lane_until_the_next_request_fits() -> None:
    lanes = Lanes({"m": Route(base_url="http://x", concurrency=8, tokens_per_minute=60_000)})
    capacities = lanes.capacities(10.0)
    assert capacities[0].free == 8  # the token bucket is the store's: the slots are asked for
    stopped = models.Claimed()
    stopped.token_waits = {"m": 0.25}
    lanes.claim_answered(capacities, stopped, 10.0)
    assert lanes.capacities(10.2) == []
    assert lanes.next_resume() == pytest.approx(10.25)
    assert [capacity.model for capacity in lanes.capacities(10.25)] == ["m"]
    lanes.claim_answered(capacities, models.Claimed(), 10.25)  # no wait reported: no pause
    assert lanes.next_resume() is None
