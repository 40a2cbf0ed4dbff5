"""What every command shares: the `--config` and `--database-url` options, loading the configuration, exit
codes, logging, and turning fusillade's errors into messages on stderr.

Exit codes: 0 success; 1 the work failed (requests failed, an object was not found, the database failed);
2 the input or the configuration is invalid (the message says what to fix); 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from fusillade import errors, runtime
from fusillade.composition import database
from fusillade.config import CONFIG_VARIABLE, Config, InvalidConfiguration, Problem, load_config
from fusillade.storage.base import Storage

T = TypeVar("T")

_PIPE_WIDTH = 200
"""Width of tables written to a file or a pipe (rich would use 80 columns), so that no cell is cut."""
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
stderr = Console(stderr=True, soft_wrap=True)


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    INVALID = 2
    INTERRUPTED = 130


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="PATH",
        help=f"The TOML configuration file (default ${CONFIG_VARIABLE}, else none: the defaults and the "
        "FUSILLADE_* variables).",
        show_default=False,
        dir_okay=False,
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        help="The database: sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE. Overrides the "
        "configuration's database_url (default $FUSILLADE_DATABASE_URL, else sqlite:///./fusillade.db).",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    str,
    typer.Option("--log-level", metavar="LEVEL", help="What to log on stderr: debug, info, warning or error."),
]


def load(path: Path | None, **flags: tuple[str, str | int | None]) -> Config:
    """The configuration from `path` and the environment, with command-line flags over both.

    `flags` maps a `FUSILLADE_*` variable to the flag that overrides it and the flag's value (None: not
    given), e.g. `FUSILLADE_DATABASE_URL=("--database-url", url)`: the flag's value is checked like the
    variable's, and a problem with it names the flag. Exits with code 2, listing every problem, when the
    configuration is invalid.
    """
    given = {variable: (flag, str(value)) for variable, (flag, value) in flags.items() if value is not None}
    environ: Mapping[str, str] = {**os.environ, **{variable: value for variable, (_, value) in given.items()}}
    try:
        return load_config(path, environ=environ)
    except InvalidConfiguration as exc:
        flag_of = {variable: flag for variable, (flag, _) in given.items()}
        problems = [
            Problem(flag_of.get(problem.source, problem.source), problem.key, problem.message)
            for problem in exc.problems
        ]
        fail(str(InvalidConfiguration(problems)), ExitCode.INVALID)


def fail(message: str, code: ExitCode = ExitCode.FAILED) -> NoReturn:
    """Print `message` on stderr and exit with `code`."""
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` in a new event loop (`fusillade.runtime.run`)."""
    return runtime.run(main)


def execute(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` in an event loop, turning fusillade's errors into a message and an exit code: a
    configuration error exits 2, any other fusillade error 1."""
    try:
        return run(main)
    except errors.ConfigurationError as exc:
        fail(str(exc), ExitCode.INVALID)
    except errors.FusilladeError as exc:
        fail(str(exc), ExitCode.FAILED)


def setup_logging(level: str) -> None:
    """Log lines on stderr, for the long-running commands."""
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        fail(f"--log-level {level!r} is not a level; use debug, info, warning or error.", ExitCode.INVALID)
    logging.basicConfig(level=number, format=runtime.LOG_FORMAT, stream=sys.stderr)


def table(title: str, *headers: str, identifiers: int = 1) -> Table:
    """A table whose first `identifiers` columns (ids, meant to be copied) are never cut or wrapped."""
    columns = [
        Column(header, no_wrap=True, min_width=len(header)) if index < identifiers else Column(header)
        for index, header in enumerate(headers)
    ]
    return Table(*columns, title=title)


def moment(value: datetime | None) -> str:
    """A timestamp for a table: UTC, to the second; "-" for none."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def unix(value: datetime | None) -> int | None:
    """A timestamp for JSON: Unix seconds, as in OpenAI's objects."""
    return int(value.timestamp()) if value is not None else None


def age(value: datetime, now: datetime) -> str:
    """How long ago `value` was, in the largest whole unit: "4s ago", "12m ago", "3h ago", "2d ago"."""
    seconds = max(0, int((now - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


async def using_storage(config: Config, action: Callable[[Storage], Awaitable[T]]) -> T:
    """Open the configuration's database (migrating it), run `action` on it, close it."""
    storage = await database.open_storage(config)
    try:
        return await action(storage)
    finally:
        await storage.close()
