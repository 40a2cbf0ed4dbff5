"""`fusillade keys create|list|revoke`: the bearer keys of the HTTP API, stored as SHA-256 hashes."""

from __future__ import annotations

import uuid
from typing import Annotated

import orjson
import typer

from fusillade import api_keys
from fusillade.cli import common
from fusillade.config import Config
from fusillade.domain import ids, models

commands = typer.Typer(
    help="Create, list and revoke the API keys of the HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@commands.command()
def create(
    owner: Annotated[
        str,
        typer.Option(
            "--owner",
            metavar="NAME",
            help="Owner of everything created with the key (others' objects are invisible to it).",
        ),
    ],
    name: Annotated[
        str, typer.Option("--name", metavar="LABEL", help="A label for people, such as 'ci' or 'alice laptop'.")
    ] = "",
    admin: Annotated[
        bool, typer.Option("--admin", help="The key sees and acts on every owner's objects.")
    ] = False,
    config: common.ConfigOption = None,
    database_url: common.DatabaseUrlOption = None,
) -> None:
    """Create a key and print it: it is shown this once only.

    The key is alone on the last line of stdout; stderr says what it is for.
    """
    if not owner.strip():
        common.fail("--owner must name an owner, such as --owner alice.", common.ExitCode.INVALID)
    settings = _load(config, database_url)
    new = api_keys.new_key()
    key = common.execute(
        common.using_storage(
            settings,
            lambda storage: storage.create_api_key(
                owner=owner.strip(), name=name, key_hash=new.key_hash, prefix=new.prefix, admin=admin
            ),
        )
    )
    role = "an admin key" if key.admin else f"a key of owner {key.owner!r}"
    common.stderr.print(
        f"Created {role}, id {key.id}. Copy it now: it cannot be shown again (only its SHA-256 is kept).\n"
        "Clients send it as `Authorization: Bearer <key>` (the openai SDK: api_key=...). A server that started "
        "without keys keeps serving without them until it is restarted.",
        highlight=False,
        markup=False,
    )
    print(new.key, flush=True)


@commands.command("list")
def list_keys(
    owner: Annotated[
        str | None, typer.Option("--owner", metavar="NAME", help="Only this owner's keys.", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: common.ConfigOption = None,
    database_url: common.DatabaseUrlOption = None,
) -> None:
    """List the keys, revoked ones too.

    The keys themselves are never stored: a listing shows their first characters.
    """
    settings = _load(config, database_url)
    scope = owner if owner is not None else models.ALL_OWNERS
    found = common.execute(common.using_storage(settings, lambda storage: storage.list_api_keys(owner=scope)))
    if as_json:
        print(orjson.dumps([_key_json(key) for key in found], option=orjson.OPT_INDENT_2).decode())
        return
    if not found:
        common.stderr.print("No API keys. Create one with `fusillade keys create --owner NAME`.", markup=False)
        return
    table = common.table("API keys", "id", "prefix", "owner", "name", "admin", "created", "revoked", identifiers=2)
    for key in found:
        table.add_row(
            str(key.id),
            f"{key.prefix}…",
            key.owner,
            key.name or "-",
            "yes" if key.admin else "no",
            common.moment(key.created_at),
            common.moment(key.revoked_at),
        )
    common.stdout.print(table)


@commands.command()
def revoke(
    key_id: Annotated[
        str, typer.Argument(metavar="KEY_ID", help="The key's id, as `fusillade keys list` shows it.")
    ],
    config: common.ConfigOption = None,
    database_url: common.DatabaseUrlOption = None,
) -> None:
    """Revoke a key: requests with it are refused from now on."""
    try:
        parsed = ids.ApiKeyId(uuid.UUID(key_id))
    except ValueError:
        common.fail(
            f"{key_id!r} is not a key id; ids are UUIDs such as 280bf828-8d27-48c6-b105-72702536a1d3, as "
            "`fusillade keys list` shows them.",
            common.ExitCode.INVALID,
        )
    settings = _load(config, database_url)
    key = common.execute(common.using_storage(settings, lambda storage: storage.revoke_api_key(parsed)))
    revoked = common.moment(key.revoked_at)
    common.stdout.print(f"Revoked key {key.id} ({key.prefix}…, owner {key.owner!r}) at {revoked}.", markup=False)


def _load(config: common.ConfigOption, database_url: str | None) -> Config:
    return common.load(config, FUSILLADE_DATABASE_URL=("--database-url", database_url))


def _key_json(key: models.ApiKey) -> dict[str, object]:
    return {
        "id": str(key.id),
        "owner": key.owner,
        "name": key.name,
        "prefix": key.prefix,
        "admin": key.admin,
        "created_at": common.unix(key.created_at),
        "revoked_at": common.unix(key.revoked_at),
    }
