"""The `fusillade` command line: one module per command (`serve` also holds `api` and `daemon`).

Every command that touches the database takes `--config PATH` (or `FUSILLADE_CONFIG`) and reads the
`FUSILLADE_*` variables; `docs/cli.md` lists every command and option, and `cli.common` the exit codes.
Help is plain text (no boxes, no colours): it reads the same in a terminal, a pipe and docs/cli.md.
"""

from __future__ import annotations

from typing import Annotated

import typer

from fusillade import __version__
from fusillade.cli import keys, migrate, run, serve, status, usage
from fusillade.mock_upstream.command import mock_upstream

app = typer.Typer(
    help="fusillade: durable batches of LLM requests, the OpenAI Batch API on your own upstreams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
app.command()(serve.serve)
app.command()(serve.api)
app.command()(serve.daemon)
app.command("run")(run.run)
app.command()(migrate.migrate)
app.command()(status.status)
app.command("usage")(usage.usage_command)
app.add_typer(keys.commands, name="keys")
app.command("mock-upstream")(mock_upstream)


def _print_version(wanted: bool) -> None:
    if wanted:
        print(__version__)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    """fusillade: durable batches of LLM requests, the OpenAI Batch API on your own upstreams."""


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    app()
