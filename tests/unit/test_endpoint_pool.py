"""The endpoint pool alone (no I/O: times are numbers), and how the daemon's pools read outcomes."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from fusillade.daemon.executor import decide_write
from fusillade.daemon.pools import EndpointPools, call_health
from fusillade.domain import ids, models
from fusillade.domain.endpoint_pool import CallHealth, EjectionPolicy, Endpoint, EndpointPool, address
from fusillade.upstream import classify
from fusillade.upstream import outcome as outcomes
from fusillade.upstream.routes import Route
from tests.unit.test_daemon_decisions import NOW, claimed
from tests.unit.test_daemon_decisions import POLICY as RETRIES

A, B, C = "http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"
POLICY = EjectionPolicy(failure_streak=3, cool_down=10.0, max_cool_down=35.0)


def by_url(pool: EndpointPool, url: str) -> Endpoint:
    return next(endpoint for endpoint in pool.endpoints if endpoint.url == url)


def call(pool: EndpointPool, now: float, health: CallHealth, *, avoid: Endpoint | None = None) -> tuple[str, bool]:
    """One call start to end at `now`: the endpoint it went to, and whether it ejected it."""
    endpoint = pool.choose(now, avoid=avoid)
    generation = endpoint.generation
    return endpoint.url, pool.finish(endpoint, generation, health, now, POLICY)


def fail_until_ejected(pool: EndpointPool, url: str, now: float) -> None:
    endpoint = by_url(pool, url)
    endpoint.in_flight += 1
    assert pool.finish(endpoint, endpoint.generation, CallHealth.UNREACHABLE, now, POLICY)


# ------------------------------------------------------------------------------------------------ choosing


def test_calls_go_to_the_endpoint_with_the_fewest_in_flight() -> None:
    pool = EndpointPool([A, B, C])
    chosen = [pool.choose(0.0).url for _ in range(6)]
    assert sorted(chosen) == sorted([A, B, C] * 2)  # spread evenly while they all stay in flight
    b = by_url(pool, B)
    pool.finish(b, b.generation, CallHealth.ANSWERED, 0.0, POLICY)
    assert pool.choose(0.0).url == B  # the only one with a free hand now
    assert [endpoint.in_flight for endpoint in pool.endpoints] == [2, 2, 2]


def test_ties_go_round_robin() -> None:
    pool = EndpointPool([A, B, C])
    urls = [call(pool, 0.0, CallHealth.ANSWERED)[0] for _ in range(6)]
    assert urls == [A, B, C, A, B, C]


def test_an_avoided_endpoint_is_taken_only_when_no_other_will_do() -> None:
    pool = EndpointPool([A, B])
    a = by_url(pool, A)
    assert {pool.choose(0.0, avoid=a).url for _ in range(3)} == {B}
    fail_until_ejected(pool, B, 0.0)
    assert pool.choose(1.0, avoid=a).url == A


# ----------------------------------------------------------------------------------------------- ejection


def test_an_unreachable_endpoint_is_ejected_at_once_and_left_out() -> None:
    pool = EndpointPool([A, B])
    url, ejected = call(pool, 0.0, CallHealth.UNREACHABLE)
    assert (url, ejected) == (A, True)
    assert not by_url(pool, A).healthy
    assert {call(pool, 5.0, CallHealth.ANSWERED)[0] for _ in range(5)} == {B}


def test_a_streak_of_failures_ejects_and_any_answer_ends_the_streak() -> None:
    pool = EndpointPool([A])
    assert [call(pool, 0.0, CallHealth.FAILED)[1] for _ in range(2)] == [False, False]
    assert call(pool, 0.0, CallHealth.ANSWERED)[1] is False  # a 4xx or a success: the streak starts again
    assert [call(pool, 0.0, CallHealth.FAILED)[1] for _ in range(3)] == [False, False, True]


def test_unknown_results_neither_count_nor_break_a_streak() -> None:
    pool = EndpointPool([A])
    call(pool, 0.0, CallHealth.FAILED)
    call(pool, 0.0, CallHealth.UNKNOWN)
    call(pool, 0.0, CallHealth.FAILED)
    assert call(pool, 0.0, CallHealth.FAILED)[1] is True


def test_calls_in_flight_when_an_endpoint_is_ejected_do_not_eject_it_again() -> None:
    pool = EndpointPool([A, B])
    calls = [(endpoint, endpoint.generation) for endpoint in (pool.choose(0.0) for _ in range(6))]
    results = [
        pool.finish(endpoint, generation, CallHealth.UNREACHABLE, 1.0, POLICY) for endpoint, generation in calls
    ]
    assert results.count(True) == 2  # once each
    assert [endpoint.ejections for endpoint in pool.endpoints] == [1, 1]
    assert [endpoint.in_flight for endpoint in pool.endpoints] == [0, 0]


def test_a_success_of_a_call_sent_before_the_ejection_does_not_restore_it() -> None:
    pool = EndpointPool([A, B])
    old = pool.choose(0.0)
    old_generation = old.generation
    fail_until_ejected(pool, old.url, 1.0)
    pool.finish(old, old_generation, CallHealth.ANSWERED, 2.0, POLICY)
    assert not old.healthy


# ------------------------------------------------------------------------------------------------ probing


def test_after_its_cool_down_one_probe_goes_and_an_answer_restores_it() -> None:
    pool = EndpointPool([A, B])
    fail_until_ejected(pool, A, 0.0)
    assert pool.choose(9.9).url == B
    probe = pool.choose(10.0)
    assert probe.url == A and probe.probing
    assert {pool.choose(10.5).url for _ in range(3)} == {B}  # one probe at a time
    pool.finish(probe, probe.generation, CallHealth.ANSWERED, 11.0, POLICY)
    assert probe.healthy and probe.ejections == 0
    assert pool.choose(11.0).url == A  # the fewest in flight again


def test_a_failed_probe_ejects_it_again_for_twice_as_long_up_to_the_cap() -> None:
    pool = EndpointPool([A, B])
    fail_until_ejected(pool, A, 0.0)
    a = by_url(pool, A)
    ends = [a.ejected_until]
    now = 0.0
    for _ in range(3):
        assert a.ejected_until is not None
        now = a.ejected_until
        probe = pool.choose(now)
        assert probe is a
        assert pool.finish(a, a.generation, CallHealth.FAILED, now, POLICY)  # one failure is enough for a probe
        ends.append(a.ejected_until)
    assert ends == [10.0, 30.0, 65.0, 100.0]  # 10, 20, then the cap of 35


def test_an_aborted_probe_lets_the_next_call_probe() -> None:
    pool = EndpointPool([A, B])
    fail_until_ejected(pool, A, 0.0)
    probe = pool.choose(10.0)
    pool.finish(probe, probe.generation, CallHealth.UNKNOWN, 10.5, POLICY)
    assert not probe.healthy and not probe.probing
    assert pool.choose(10.5).url == A


def test_with_every_endpoint_ejected_calls_still_go_to_the_one_back_soonest() -> None:
    pool = EndpointPool([A, B])
    fail_until_ejected(pool, A, 0.0)
    fail_until_ejected(pool, B, 1.0)
    calls = [pool.choose(2.0) for _ in range(4)]
    assert {endpoint.url for endpoint in calls} == {A}
    # Their failures change nothing (no second ejection, no doubling); the first answer restores it.
    a = by_url(pool, A)
    assert not pool.finish(a, a.generation, CallHealth.UNREACHABLE, 3.0, POLICY)
    assert a.ejected_until == 10.0 and a.ejections == 1
    pool.finish(a, a.generation, CallHealth.ANSWERED, 3.0, POLICY)
    assert a.healthy


def test_a_new_pool_keeps_the_endpoints_that_stay() -> None:
    old = EndpointPool([A, B])
    fail_until_ejected(old, A, 0.0)
    old.choose(0.0)  # one call in flight on B
    new = EndpointPool([B, A, C], keep=old)
    assert by_url(new, A) is by_url(old, A) and not by_url(new, A).healthy
    assert by_url(new, B).in_flight == 1
    assert by_url(new, C).healthy and by_url(new, C).in_flight == 0


@pytest.mark.parametrize(("urls", "message"), [([], "at least one"), ([A, A], "each endpoint once")])
def test_a_pool_refuses_no_endpoint_or_one_twice(urls: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EndpointPool(urls)


def test_a_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="failure_streak"):
        EjectionPolicy(failure_streak=0)
    with pytest.raises(ValueError, match="cool_down"):
        EjectionPolicy(cool_down=60.0, max_cool_down=30.0)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.7:8000/v1", "10.0.0.7:8000"),
        ("https://api.example.com/secret-token/v1", "api.example.com:443"),
        ("http://[::1]:9000", "[::1]:9000"),
        ("http://host", "host:80"),
    ],
)
def test_an_endpoint_is_named_by_its_host_and_port_only(url: str, expected: str) -> None:
    assert address(url) == expected


# ------------------------------------------------------------------------------ the daemon's pools


@pytest.mark.parametrize(
    ("result", "health"),
    [
        (outcomes.Success(status_code=200, body="{}", usage=None), CallHealth.ANSWERED),
        (classify.connection_error(ConnectionRefusedError("refused")), CallHealth.UNREACHABLE),
        (classify.timeout("connect", "no connection within 10 s"), CallHealth.UNREACHABLE),
        (classify.timeout("first_byte", "no response headers within 300 s"), CallHealth.FAILED),
        (outcomes.Retriable(code="stream_error", message="cut"), CallHealth.FAILED),
        (outcomes.Retriable(code="http_502", message="bad gateway", status_code=502), CallHealth.FAILED),
        (outcomes.Retriable(code="http_429", message="slow down", status_code=429), CallHealth.ANSWERED),
        (outcomes.Permanent(code="http_400", message="bad", status_code=400), CallHealth.ANSWERED),
        (outcomes.Permanent(code="invalid_request", message="no URL"), CallHealth.UNKNOWN),
    ],
)
def test_outcomes_say_what_they_say_of_their_endpoint(result: outcomes.Outcome, health: CallHealth) -> None:
    assert call_health(result) is health


def test_the_daemons_pools_send_each_call_with_its_endpoints_route_and_retry_elsewhere() -> None:
    pools = EndpointPools()
    route = Route(base_urls=(A, B), concurrency=4)
    request_id = ids.new_request_id()
    chosen = pools.choose("m", route, 0.0, request_id)
    assert chosen.route.base_urls == (chosen.endpoint.url,) and chosen.route.concurrency == 4
    assert pools.finish(chosen, CallHealth.UNREACHABLE, 0.0, POLICY)
    assert pools.retry_elsewhere(chosen, request_id)
    # Its next call avoids the endpoint that failed it; the other calls go to the healthy one too.
    again = pools.choose("m", route, 1.0, request_id)
    assert again.endpoint is not chosen.endpoint
    assert pools.in_flight() == {("m", "a:8000"): 0, ("m", "b:8000"): 1}
    assert pools.ejected()[("m", address(chosen.endpoint.url))] == 1
    # With no healthy endpoint besides the failed one, the retry backs off as usual.
    pools.finish(again, CallHealth.UNREACHABLE, 1.0, POLICY)
    assert not pools.retry_elsewhere(again, request_id)


def test_a_reloaded_route_keeps_the_health_of_the_endpoints_that_stay() -> None:
    pools = EndpointPools()
    first = Route(base_urls=(A, B))
    chosen = pools.choose("m", first, 0.0, ids.new_request_id())
    pools.finish(chosen, CallHealth.UNREACHABLE, 0.0, POLICY)
    reloaded = Route(base_urls=(A, B, C), stream=True)
    later = [pools.choose("m", reloaded, 1.0, ids.new_request_id()) for _ in range(4)]
    assert chosen.endpoint.url not in {call.endpoint.url for call in later}
    assert all(call.route.stream for call in later)
    pools.forget_others(set())
    assert pools.in_flight() == {}


def test_retry_elsewhere_starts_at_once_and_still_counts_an_attempt() -> None:
    result = outcomes.Retriable(
        code="http_503", message="down", status_code=503, retry_after=timedelta(seconds=30)
    )
    decision = decide_write(claimed(attempt=1), result, policy=RETRIES, now=NOW, random_value=0.5, elsewhere=True)
    assert isinstance(decision.write, models.Reschedule)
    assert decision.retry_at == NOW  # neither the backoff nor the failed endpoint's Retry-After
    last = decide_write(claimed(attempt=2), result, policy=RETRIES, now=NOW, random_value=0.5, elsewhere=True)
    assert isinstance(last.write, models.Fail) and last.gave_up == "max_attempts"


# ----------------------------------------------------------------------------------------------------- routes


def test_a_route_of_one_endpoint_has_it_as_its_only_base_url() -> None:
    assert Route(base_url=A).base_urls == (A,)
    pool = Route(base_urls=[A, B])  # type: ignore[arg-type]
    assert (pool.base_url, pool.base_urls) == (A, (A, B))
    assert pool.endpoint_route(B) == Route(base_url=B)
    moved = dataclasses.replace(Route(base_url=A, concurrency=3), base_url=B)
    assert (moved.base_urls, moved.concurrency) == ((B,), 3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs a base_url"),
        ({"base_url": B, "base_urls": (A, B)}, "must be the first of base_urls"),
        ({"base_urls": (A, A)}, "lists an endpoint twice"),
    ],
)
def test_a_route_refuses_no_endpoint_a_mismatch_or_one_twice(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Route(**options)  # type: ignore[arg-type]
