"""Checking a `fusillade ...` command line without running it: the CLI's own parser (typer's click) reads it, as
`fusillade` would before calling the command. Used on every command written in the deployment files and docs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer
import typer.core
import typer.main

from fusillade.cli.main import app

try:  # typer 0.29 and later carry their own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer, on click itself
    from click.exceptions import UsageError  # type: ignore[assignment,no-redef,unused-ignore]

__all__ = ["UsageError", "command_names", "parse"]


def parse(arguments: Sequence[str]) -> Any:
    """The click context of `fusillade ARGUMENTS` (its `params` are the parsed options), the subcommand's name in
    `info_name`. Raises `UsageError` for an unknown command or option, a missing or bad value, as the CLI would
    (exit code 2). Nothing runs: only parameter parsing and conversion."""
    command: Any = typer.main.get_command(app)
    context: Any = None
    name, rest = "fusillade", list(arguments)
    while isinstance(command, typer.core.TyperGroup) and rest and not rest[0].startswith("-"):
        context = command.make_context(name, rest[:1], parent=context)
        subcommand = command.get_command(context, rest[0])
        if subcommand is None:
            raise UsageError(f"No such command {rest[0]!r}.", context)
        command, name, rest = subcommand, rest[0], rest[1:]
    return command.make_context(name, rest, parent=context)


def command_names() -> set[str]:
    """The names of the top-level commands (`serve`, `api`, `keys`, ...)."""
    group: Any = typer.main.get_command(app)
    return set(group.list_commands(group.make_context("fusillade", ["serve"])))
