"""The models a server serves, as its users see them: `GET /v1/models` and the no-route message of an upload.

A model is served when it has a route of its own, or when a default route takes every model without one. The
routing table changes when the configuration is reloaded, so `ServedModels` is a snapshot: the composition root
makes a new one at each reload (a route keeps the time it first appeared) and readers take the one in force.

Which models went to the default route is private to each owner: a tenant's model name may say what the tenant
works on. They are recorded per owner when an upload names them (`SeenModels` gathers them while the upload streams
by; the storage writes them in the upload's transaction) and listed per owner; an admin sees every owner's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

MAX_NAMED: Final = 20
"""Models named in a no-route message; the others are counted."""
SEEN_LISTED: Final = 1000
"""Default-route models a listing returns per owner: the most recently first seen."""
SEEN_PER_FILE: Final = 1000
"""Distinct default-route models recorded per upload; the file's further models are not recorded."""
MAX_SEEN_LENGTH: Final = 256
"""Longer model names are neither recorded nor looked up (a name is a key of the table that records them)."""
_SHOWN_CHARACTERS: Final = 60
_CONTROL_CHARACTER: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True, kw_only=True)
class SeenModel:
    """A model without a route of its own that an owner's upload named (it goes to the default route)."""

    model: str
    first_seen_at: datetime
    """The upload that named it first (for an admin's view, the earliest among owners)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ListedModel:
    """One entry of the models listing."""

    name: str
    created_at: datetime
    """Own route: when this process first had it; default route: when an upload first named the model."""
    default_route: bool
    """Served by the default route (named by an upload) rather than by a route of its own."""


@dataclass(frozen=True, slots=True)
class ServedModels:
    """The routing table in force, without its upstreams: the models with a route of their own (each with the
    time this process first had it) and whether a default route serves every other model."""

    routes: Mapping[str, datetime]
    default_route: bool

    @classmethod
    def of(
        cls,
        names: Iterable[str],
        *,
        default_route: bool,
        now: datetime,
        previous: ServedModels | None = None,
    ) -> ServedModels:
        """The models `names` routed since `now`, except those `previous` already routed, which keep their time."""
        earlier = previous.routes if previous is not None else {}
        return cls({name: earlier.get(name, now) for name in sorted(names)}, default_route)

    def accepts(self, model: str) -> bool:
        """Whether requests for `model` can be sent somewhere (what an upload checks for each line)."""
        return self.default_route or model in self.routes

    def to_default_route(self, model: str) -> bool:
        """Whether `model` goes to the default route (no route of its own): such models are recorded per owner."""
        return self.default_route and model not in self.routes

    def describe(self, limit: int = MAX_NAMED) -> str:
        """`served models: a, b, c (and 4 more)`, at most `limit` names in name order, each cut to 60 characters;
        the default route is mentioned when there is one."""
        names = [_cut(name) for name in list(self.routes)[:limit]]
        more = len(self.routes) - len(names)
        if not names:
            text = "no model has a route of its own" if self.default_route else "no model is served (no route)"
        else:
            text = "served models: " + ", ".join(names) + (f" (and {more} more)" if more else "")
        return text + ("; the default route serves every other model" if self.default_route else "")

    def listing(self, seen: Iterable[SeenModel]) -> list[ListedModel]:
        """The models with a route of their own, then (with a default route) the `seen` ones without, each in name
        order and once."""
        listed = [ListedModel(name=name, created_at=at, default_route=False) for name, at in self.routes.items()]
        if self.default_route:
            others = sorted((entry for entry in seen if entry.model not in self.routes), key=lambda e: e.model)
            listed.extend(
                ListedModel(name=entry.model, created_at=entry.first_seen_at, default_route=True)
                for entry in others
            )
        return listed

    def find(self, model: str, seen: SeenModel | None) -> ListedModel | None:
        """`model` as listed, given its record (`seen`) if it has one; None when it is not served."""
        since = self.routes.get(model)
        if since is not None:
            return ListedModel(name=model, created_at=since, default_route=False)
        if self.default_route and seen is not None and seen.model == model:
            return ListedModel(name=model, created_at=seen.first_seen_at, default_route=True)
        return None


class SeenModels:
    """Gathers the distinct models of one upload that `record` accepts (those going to the default route), at
    most `SEEN_PER_FILE`, none longer than `MAX_SEEN_LENGTH` characters. A backend feeds it every template's
    model while it stores an upload, then records `models` in the same transaction."""

    __slots__ = ("_found", "_record")

    def __init__(self, record: Callable[[str], bool]) -> None:
        self._record = record
        self._found: set[str] = set()

    def add(self, model: str) -> None:
        found = self._found
        if model in found or len(found) >= SEEN_PER_FILE or len(model) > MAX_SEEN_LENGTH:
            return
        if self._record(model):
            found.add(model)

    @property
    def models(self) -> list[str]:
        """Sorted: two uploads recording the same models at once take their rows' locks in the same order (on
        PostgreSQL, two orders could deadlock)."""
        return sorted(self._found)


def can_be_seen(model: str) -> bool:
    """Whether `model` could have been recorded, so is worth looking up: not empty, not too long, valid UTF-8
    text without a control character (an upload refuses those)."""
    if not 0 < len(model) <= MAX_SEEN_LENGTH or _CONTROL_CHARACTER.search(model):
        return False
    try:
        model.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _cut(name: str) -> str:
    return name if len(name) <= _SHOWN_CHARACTERS else name[:_SHOWN_CHARACTERS] + "…"
