"""`domain.served`: the routing table as users see it (what is accepted, what goes to the default route, the
no-route message's list), the models listing, and what an upload records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fusillade.domain import served

LOADED = datetime(2026, 1, 1, tzinfo=UTC)
LATER = LOADED + timedelta(hours=1)


def table(*names: str, default_route: bool = False) -> served.ServedModels:
    return served.ServedModels.of(names, default_route=default_route, now=LOADED)


def test_own_routes_are_accepted_and_others_only_with_a_default_route() -> None:
    without = table("b", "a")
    with_default = table("a", default_route=True)

    assert (without.accepts("a"), without.accepts("other")) == (True, False)
    assert (with_default.accepts("a"), with_default.accepts("other")) == (True, True)
    assert not without.to_default_route("other")  # refused, so never recorded
    assert (with_default.to_default_route("a"), with_default.to_default_route("other")) == (False, True)
    assert list(without.routes) == ["a", "b"]


def test_a_reload_keeps_the_time_of_routes_it_keeps() -> None:
    first = table("kept", "dropped")
    reloaded = served.ServedModels.of(["kept", "new"], default_route=False, now=LATER, previous=first)

    assert dict(reloaded.routes) == {"kept": LOADED, "new": LATER}


def test_describe_names_up_to_twenty_models_and_counts_the_rest() -> None:
    names = [f"model-{index:02}" for index in range(24)]

    assert table(*names).describe() == ("served models: " + ", ".join(names[:20]) + " (and 4 more)")
    assert table("b", "a").describe() == "served models: a, b"
    assert table("a", "b", "c").describe(limit=2) == "served models: a, b (and 1 more)"


def test_describe_without_routes_and_with_a_default_route() -> None:
    assert table().describe() == "no model is served (no route)"
    assert table(default_route=True).describe() == (
        "no model has a route of its own; the default route serves every other model"
    )
    assert table("a", default_route=True).describe() == (
        "served models: a; the default route serves every other model"
    )


def test_describe_cuts_long_names() -> None:
    long_name = "x" * 100

    assert table(long_name).describe() == f"served models: {'x' * 60}…"


def test_the_listing_puts_own_routes_first_and_each_model_once() -> None:
    seen = [
        served.SeenModel(model="zeta", first_seen_at=LATER),
        served.SeenModel(model="own", first_seen_at=LATER),  # since given a route of its own
        served.SeenModel(model="alpha", first_seen_at=LOADED),
    ]

    listed = table("own", "b-own", default_route=True).listing(seen)

    assert [(entry.name, entry.created_at, entry.default_route) for entry in listed] == [
        ("b-own", LOADED, False),
        ("own", LOADED, False),
        ("alpha", LOADED, True),
        ("zeta", LATER, True),
    ]
    assert [entry.name for entry in table("own").listing(seen)] == ["own"]  # no default route: none seen


def test_find_a_model_as_the_listing_shows_it() -> None:
    record = served.SeenModel(model="private", first_seen_at=LATER)
    routing = table("own", default_route=True)

    assert routing.find("own", None) == served.ListedModel(name="own", created_at=LOADED, default_route=False)
    assert routing.find("private", record) == served.ListedModel(
        name="private", created_at=LATER, default_route=True
    )
    assert routing.find("private", None) is None
    assert table("own").find("private", record) is None  # the default route is gone


def test_an_upload_records_each_accepted_model_once_within_the_bounds() -> None:
    seen = served.SeenModels(lambda model: model != "routed")
    for model in ["b", "routed", "a", "b", "x" * (served.MAX_SEEN_LENGTH + 1), "x" * served.MAX_SEEN_LENGTH]:
        seen.add(model)

    assert seen.models == ["a", "b", "x" * served.MAX_SEEN_LENGTH]

    many = served.SeenModels(lambda model: True)
    for index in range(served.SEEN_PER_FILE + 5):
        many.add(f"m{index}")
    assert set(many.models) == {f"m{index}" for index in range(served.SEEN_PER_FILE)}  # the first met


def test_only_names_an_upload_could_record_are_looked_up() -> None:
    assert served.can_be_seen("meta-llama/Llama-3.1-8B-Instruct")
    assert served.can_be_seen("ünïcødé ✓")
    assert not served.can_be_seen("")
    assert not served.can_be_seen("a" * (served.MAX_SEEN_LENGTH + 1))
    assert not served.can_be_seen("with\x00nul")
    assert not served.can_be_seen("line\nbreak")
    assert not served.can_be_seen("lone \ud800 surrogate")
