"""KeyStore: API keys stored by hash, found by hash unless revoked, listed per owner, revoked once."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from fusillade import api_keys, errors
from fusillade import clock as clocks
from fusillade.domain import ids, models
from fusillade.storage import base

SECOND = timedelta(seconds=1)


async def create(
    storage: base.Storage, owner: str = "alice", *, name: str = "ci", admin: bool = False
) -> tuple[models.ApiKey, api_keys.NewKey]:
    new = api_keys.new_key()
    stored = await storage.create_api_key(
        owner=owner, name=name, key_hash=new.key_hash, prefix=new.prefix, admin=admin
    )
    return stored, new


async def test_create_and_find(storage: base.Storage, clock: clocks.ManualClock) -> None:
    stored, new = await create(storage, "alice", name="alice laptop")
    assert stored.owner == "alice"
    assert stored.name == "alice laptop"
    assert stored.prefix == new.prefix
    assert stored.admin is False
    assert stored.created_at == clock.now()
    assert stored.revoked_at is None
    assert await storage.find_api_key(new.key_hash) == stored
    assert await storage.find_api_key(api_keys.new_key().key_hash) is None


async def test_only_the_hash_of_the_key_is_stored(storage: base.Storage) -> None:
    stored, new = await create(storage)
    assert {field.name for field in dataclasses.fields(models.ApiKey)}.isdisjoint({"key", "key_hash"})
    assert new.key not in {str(value) for value in dataclasses.astuple(stored)}
    assert await storage.find_api_key(api_keys.hash_key(new.key)) == stored
    assert await storage.find_api_key(new.key) is None
    # A caller passing the key itself instead of its hash is refused, so the key can never end up stored.
    with pytest.raises(errors.ValidationError):
        await storage.create_api_key(owner="alice", name="oops", key_hash=new.key, prefix=new.prefix)
    assert await storage.list_api_keys() == [stored]


async def test_admin_flag_round_trips(storage: base.Storage, clock: clocks.ManualClock) -> None:
    admin, admin_new = await create(storage, "ops", admin=True)
    clock.advance(SECOND)
    plain, plain_new = await create(storage, "alice")
    assert admin.admin is True
    assert plain.admin is False
    found_admin = await storage.find_api_key(admin_new.key_hash)
    found_plain = await storage.find_api_key(plain_new.key_hash)
    assert found_admin is not None and found_admin.admin is True
    assert found_plain is not None and found_plain.admin is False
    assert [key.admin for key in await storage.list_api_keys()] == [True, False]


async def test_duplicate_hash_is_refused(storage: base.Storage) -> None:
    stored, new = await create(storage, "alice")
    with pytest.raises(errors.ValidationError):
        await storage.create_api_key(owner="bob", name="copy", key_hash=new.key_hash, prefix=new.prefix)
    # A revoked key's hash stays taken: adding it again must not bring the key back to life.
    await storage.revoke_api_key(stored.id)
    with pytest.raises(errors.ValidationError):
        await storage.create_api_key(owner="alice", name="again", key_hash=new.key_hash, prefix=new.prefix)
    assert [key.id for key in await storage.list_api_keys()] == [stored.id]
    assert await storage.find_api_key(new.key_hash) is None


async def test_revoked_key_is_not_found_at_once(storage: base.Storage, clock: clocks.ManualClock) -> None:
    stored, new = await create(storage)
    clock.advance(SECOND)
    kept, kept_new = await create(storage)
    clock.advance(SECOND)
    revoked = await storage.revoke_api_key(stored.id)
    assert revoked == dataclasses.replace(stored, revoked_at=clock.now())
    assert await storage.find_api_key(new.key_hash) is None
    assert await storage.find_api_key(kept_new.key_hash) == kept
    assert await storage.list_api_keys() == [revoked, kept]


async def test_revoke_is_idempotent_and_keeps_the_first_time(
    storage: base.Storage, clock: clocks.ManualClock
) -> None:
    stored, _ = await create(storage)
    clock.advance(SECOND)
    first = await storage.revoke_api_key(stored.id)
    revoked_at = clock.now()
    clock.advance(SECOND)
    second = await storage.revoke_api_key(stored.id)
    assert first.revoked_at == second.revoked_at == revoked_at
    assert second == first
    assert await storage.list_api_keys() == [first]


async def test_revoke_unknown_key_is_not_found(storage: base.Storage) -> None:
    stored, new = await create(storage)
    with pytest.raises(errors.NotFound):
        await storage.revoke_api_key(ids.new_api_key_id())
    assert await storage.find_api_key(new.key_hash) == stored


async def test_list_by_owner_oldest_first(storage: base.Storage, clock: clocks.ManualClock) -> None:
    assert await storage.list_api_keys() == []
    made: list[models.ApiKey] = []
    for owner in ["bob", "alice", "bob", "carol", "alice"]:
        stored, _ = await create(storage, owner)
        made.append(stored)
        clock.advance(SECOND)
    assert await storage.list_api_keys() == made
    assert await storage.list_api_keys(owner=models.ALL_OWNERS) == made
    assert await storage.list_api_keys(owner="alice") == [made[1], made[4]]
    assert await storage.list_api_keys(owner="bob") == [made[0], made[2]]
    assert await storage.list_api_keys(owner="nobody") == []
