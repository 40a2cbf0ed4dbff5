"""`fusillade` commands. This first slice has `migrate`; `serve`, `daemon`, `run` and the rest follow."""

from __future__ import annotations

import asyncio
import os

import typer

from fusillade import __version__, errors
from fusillade.storage import factory

DEFAULT_DATABASE_URL = "sqlite:///./fusillade.db"

app = typer.Typer(help="fusillade: durable batches of LLM requests.", no_args_is_help=True)


def _database_url(option: str | None) -> str:
    return option or os.environ.get("FUSILLADE_DATABASE_URL") or DEFAULT_DATABASE_URL


@app.command()
def migrate(
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help=f"sqlite:///PATH or postgresql://…; default $FUSILLADE_DATABASE_URL, else {DEFAULT_DATABASE_URL}.",
    ),
) -> None:
    """Create or upgrade the database schema (safe to run from several processes at once)."""
    url = _database_url(database_url)

    async def run() -> list[str]:
        store = await factory.open_storage(url, migrate=False)
        try:
            return await store.migrate()
        finally:
            await store.close()

    try:
        applied = asyncio.run(run())
    except errors.FusilladeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if applied:
        typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        typer.echo("the database schema is up to date")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
