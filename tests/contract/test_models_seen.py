"""Models seen per owner (recorded by an upload for the default route, listed per owner, an admin sees every
owner's once), and the requests in flight per model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from fusillade import clock as clocks
from fusillade import errors
from fusillade.domain import models, served
from fusillade.storage import base
from tests.support import factories

MINUTE = timedelta(minutes=1)
ROUTED = frozenset({"routed"})


def default_route(model: str) -> bool:
    """Record every model without a route of its own."""
    return model not in ROUTED


async def upload(storage: base.Storage, owner: str, *names: str) -> models.File:
    items = factories.templates(models_by_line=list(names))
    return await storage.create_file(
        owner=owner, filename="in.jsonl", templates=items, size_bytes=100, record_model=default_route
    )


def pairs(found: list[served.SeenModel]) -> list[tuple[str, object]]:
    return [(entry.model, entry.first_seen_at) for entry in found]


async def test_an_upload_records_its_models_of_the_default_route_for_its_owner(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    start = clock.now()
    await upload(storage, "alice", "llama", "routed", "llama", "meta-llama/Llama-3.1-8B-Instruct")
    clock.advance(MINUTE)
    await upload(storage, "bob", "bobs-secret")

    assert pairs(await storage.list_models_seen(owner="alice")) == [
        ("llama", start),
        ("meta-llama/Llama-3.1-8B-Instruct", start),
    ]
    assert pairs(await storage.list_models_seen(owner="bob")) == [("bobs-secret", start + MINUTE)]
    assert await storage.list_models_seen(owner="carol") == []


async def test_a_model_keeps_the_time_it_was_first_seen(storage: base.Storage, clock: clocks.ManualClock) -> None:
    first = clock.now()
    await upload(storage, "alice", "old")
    clock.advance(MINUTE)
    await upload(storage, "alice", "old", "new")

    assert pairs(await storage.list_models_seen(owner="alice")) == [("new", first + MINUTE), ("old", first)]


async def test_the_listing_is_bounded_to_the_most_recently_first_seen(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    start = clock.now()
    for name in ["first", "second", "third"]:
        await upload(storage, "alice", name)
        clock.advance(MINUTE)

    assert pairs(await storage.list_models_seen(owner="alice", limit=2)) == [
        ("third", start + 2 * MINUTE),
        ("second", start + MINUTE),
    ]


async def test_an_admin_sees_every_owners_models_once_with_the_earliest_time(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    start = clock.now()
    await upload(storage, "alice", "shared", "alice-only")
    clock.advance(MINUTE)
    await upload(storage, "bob", "shared", "bob-only")

    assert pairs(await storage.list_models_seen(owner=models.ALL_OWNERS)) == [
        ("bob-only", start + MINUTE),
        ("alice-only", start),
        ("shared", start),
    ]
    assert pairs(await storage.list_models_seen(owner=models.ALL_OWNERS, limit=1)) == [
        ("bob-only", start + MINUTE)
    ]
    assert pairs(await storage.list_models_seen(owner=models.ALL_OWNERS, model="shared")) == [("shared", start)]


async def test_one_model_is_looked_up_within_its_owner(storage: base.Storage, clock: clocks.ManualClock) -> None:
    await upload(storage, "alice", "private", "other")

    assert pairs(await storage.list_models_seen(owner="alice", model="private")) == [("private", clock.now())]
    assert await storage.list_models_seen(owner="bob", model="private") == []
    assert await storage.list_models_seen(owner="alice", model="missing") == []
    assert await storage.list_models_seen(owner="alice", model="routed") == []


async def test_odd_names_are_kept_as_they_are_and_too_long_ones_are_not_recorded(storage: base.Storage) -> None:
    longest = "m" * served.MAX_SEEN_LENGTH
    odd = ["ünïcødé ✓", "with 'quotes' and \"doubles\"", "percent%2Fslash/and?query#frag", longest]
    await upload(storage, "alice", *odd, longest + "m")

    assert sorted(entry.model for entry in await storage.list_models_seen(owner="alice")) == sorted(odd)


async def test_nothing_is_recorded_without_record_model_or_for_a_rejected_upload(storage: base.Storage) -> None:
    await storage.create_file(
        owner="alice", filename="a.jsonl", templates=factories.templates(models_by_line=["plain"]), size_bytes=10
    )

    async def failing() -> AsyncIterator[models.TemplateInput]:
        for item in factories.templates(models_by_line=["lost"] * 3):
            yield item
        raise errors.ValidationError("bad line", errors=[errors.LineError(4, "bad")])

    with pytest.raises(errors.ValidationError):
        await storage.create_file(
            owner="alice", filename="b.jsonl", templates=failing(), size_bytes=10, record_model=default_route
        )
    assert await storage.list_models_seen(owner=models.ALL_OWNERS) == []


async def test_requests_in_flight_are_counted_per_model(storage: base.Storage) -> None:
    assert await storage.in_flight_by_model() == {}
    await factories.create_batch(storage, models_by_line=["a"] * 4 + ["b"] * 2 + ["idle"])
    daemon_id = await factories.register(storage)
    first, second, third = await factories.claim(storage, daemon_id, 3, model="a")
    [other] = await factories.claim(storage, daemon_id, 1, model="b")
    await factories.start(storage, daemon_id, [second.id])  # processing counts as in flight too
    await factories.complete(storage, daemon_id, [first.id])

    assert await storage.in_flight_by_model() == {"a": 2, "b": 1}

    await factories.apply(storage, daemon_id, models.Release(third.id), models.Release(other.id))
    assert await storage.in_flight_by_model() == {"a": 1}
