"""API keys of the HTTP API: how they look, and how they are stored (only their SHA-256, never the key)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

KEY_PREFIX = "fus_"
_SHOWN_CHARACTERS = 8


@dataclass(frozen=True, slots=True)
class NewKey:
    key: str = field(repr=False)
    """The key itself: shown once to its creator, never stored."""
    key_hash: str
    prefix: str
    """The first characters, stored to recognise the key in listings."""


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key, as stored and looked up. Keys are long random strings, so a plain hash is enough
    (no salt or slow hash is needed against guessing)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(30)
    return NewKey(key=key, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + _SHOWN_CHARACTERS])
