"""`fusillade run requests.jsonl`: run one batch file locally, with a live progress bar; re-run to resume.

Exit codes: 0 every request completed; 1 some requests failed (their lines are in the error file) or the run
itself failed; 2 the input, a `--model-route` or the configuration is invalid; 130 interrupted (run the same
command again to continue).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import pydantic
import typer
from pydantic_core import ErrorDetails
from rich.logging import RichHandler

from fusillade import errors
from fusillade.cli import common, progress, tokens
from fusillade.config import Config, RouteSection
from fusillade.domain import models
from fusillade.domain.prices import Prices

if TYPE_CHECKING:
    from fusillade.cli import local_run

ROUTE_SYNTAX = "MODEL=URL[,URL...][,concurrency=N][,key-env=VAR][,stream]"
_ROUTE_OPTIONS = {"base_url": "URL", "concurrency": "concurrency", "api_key_env": "key-env", "stream": "stream"}
_SHOWN_ERRORS = 50


def run(
    input: Annotated[
        Path,
        typer.Argument(
            metavar="REQUESTS.jsonl",
            help="OpenAI batch input: one request a line (custom_id, method, url, body).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    model_route: Annotated[
        list[str] | None,
        typer.Option(
            "--model-route",
            "-m",
            metavar="ROUTE",
            help=f"Where a model's requests go (repeatable): ROUTE is {ROUTE_SYNTAX}; MODEL '*' is the route "
            "of every other model; several URLs are a pool of endpoints. Adds to or replaces the configuration's "
            "routes; key-env names the variable that holds the key.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output file (default: <input name>.output.jsonl); written only if a request completed.",
            show_default=False,
        ),
    ] = None,
    errors_path: Annotated[
        Path | None,
        typer.Option(
            "--errors",
            "-e",
            metavar="PATH",
            help="Error file (default: <input name>.errors.jsonl); written only if a request failed.",
            show_default=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            help="State database of the run (default: sqlite:///<input name>.fusillade.db next to the input).",
            show_default=False,
        ),
    ] = None,
    completion_window: Annotated[
        str,
        typer.Option(
            "--completion-window",
            metavar="WINDOW",
            help="Unfinished requests end with batch_expired after this long, as in OpenAI (24h, 7d, ...).",
        ),
    ] = "365d",
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed", help="On a re-run, send again the requests that failed the last time."),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Show no progress (the summary at the end is still printed)."),
    ] = False,
    progress_interval: Annotated[
        float,
        typer.Option(
            "--progress-interval",
            metavar="SECONDS",
            min=0.1,
            help="When stderr is not a terminal (a log file, a pipe, CI), print a progress line this often.",
        ),
    ] = progress.LINE_INTERVAL,
    config: common.ConfigOption = None,
) -> None:
    """Run a batch file here and write its results.

    Checks the whole file first, then sends its requests with a live progress bar on a terminal (a plain line
    every few seconds in a log or a pipe), and writes the output and error files when the batch is done. Run
    the same command again after a crash or Ctrl-C and it continues where it stopped.
    """
    from fusillade.cli import local_run  # with the daemon and the upstream client: only when a run starts
    from fusillade.composition import routing

    # Warnings (a failing database, a crashed loop) print above the progress bar, not through it.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=common.stderr, show_time=False, show_path=False)],
    )
    settings = with_model_routes(common.load(config), model_route or [])
    files = local_run.RunFiles.beside(input, output=output, errors=errors_path, database_url=database_url)
    try:
        models.parse_completion_window(completion_window)
    except errors.ValidationError as exc:
        common.fail(f"--completion-window: {exc}", common.ExitCode.INVALID)
    started = time.monotonic()
    try:
        outcome = common.run(
            local_run.run_batch(
                settings,
                files,
                completion_window=completion_window,
                retry_failed=retry_failed,
                display=progress.for_console(common.stderr, input.name, quiet=quiet, interval=progress_interval),
                note=lambda message: common.stderr.print(message, highlight=False, markup=False),
            )
        )
    except local_run.InvalidInput as exc:
        _invalid_input(input, exc, exc.unrouted, served=routing.served_models(settings).describe())
    except errors.ValidationError as exc:
        _invalid_input(input, exc, [], served="")
    except errors.ConfigurationError as exc:
        common.fail(str(exc), common.ExitCode.INVALID)
    except errors.FusilladeError as exc:
        common.fail(str(exc), common.ExitCode.FAILED)
    except KeyboardInterrupt:
        common.fail("Interrupted before the run started; nothing was sent.", common.ExitCode.INTERRUPTED)
    raise typer.Exit(_report(outcome, files, time.monotonic() - started, settings.prices()))


def with_model_routes(config: Config, options: list[str]) -> Config:
    """`config` with the routes of `--model-route` options over its own; exits with code 2 on a bad one."""
    routes = dict(config.models)
    default = config.default_route
    problems = []
    for text in options:
        try:
            model, section = parse_model_route(text)
        except ValueError as exc:
            problems.append(f"--model-route {text}: {exc}")
            continue
        if model == "*":
            default = section
        else:
            routes[model] = section
    if problems:
        common.fail("\n".join(problems), common.ExitCode.INVALID)
    return config.model_copy(update={"models": routes, "default_route": default})


def parse_model_route(text: str) -> tuple[str, RouteSection]:
    """`MODEL=URL[,URL...][,concurrency=N][,key-env=VAR][,stream]` -> the model and its route (several URLs: a
    pool of endpoints); ValueError saying what is wrong."""
    model, separator, rest = text.partition("=")
    if not separator or not model or not rest:
        raise ValueError(f"write it as {ROUTE_SYNTAX}, such as llama=http://127.0.0.1:8000,concurrency=32")
    url, *settings = rest.split(",")
    urls = [url]
    values: dict[str, object] = {}
    for setting in settings:
        name, has_value, value = setting.partition("=")
        if setting.startswith(("http://", "https://")):
            urls.append(setting)
        elif name == "stream" and not has_value:
            values["stream"] = True
        elif name == "concurrency" and has_value:
            values["concurrency"] = value
        elif name == "key-env" and has_value:
            values["api_key_env"] = value
        else:
            raise ValueError(
                f"unknown setting {setting!r}; the settings are concurrency=N, key-env=VAR and stream"
            )
    values["base_url"] = urls[0] if len(urls) == 1 else urls
    try:
        return model, RouteSection.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ValueError("; ".join(_describe(error) for error in exc.errors())) from None


def _describe(error: ErrorDetails) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    context = error.get("ctx") or {}
    message = str(context["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{_ROUTE_OPTIONS.get(field, field)}: {message}"


def _invalid_input(
    path: Path, error: errors.ValidationError, unrouted: Sequence[local_run.UnroutedModel], *, served: str
) -> NoReturn:
    """Every bad line, then each model without a route and, once, the models that are served."""
    common.stderr.print(f"[bold red]error:[/] {path} cannot be run; nothing was sent.", highlight=False)
    for line in error.errors[:_SHOWN_ERRORS]:
        where = f"{path}:{line.line}" if line.line else str(path)
        common.stderr.print(f"  {where}: {line.reason}", highlight=False, markup=False)
    if len(error.errors) > _SHOWN_ERRORS:
        common.stderr.print(f"  ... and {len(error.errors) - _SHOWN_ERRORS} more", highlight=False)
    for model in unrouted:
        lines = ", ".join(map(str, model.first_lines)) + (", ..." if model.lines > len(model.first_lines) else "")
        common.stderr.print(
            f"  model {model.name!r} ({model.lines:,} lines: {lines}) has no route: add --model-route "
            f'{model.name}=http://HOST:PORT (or a [models."{model.name}"] table in the configuration).',
            highlight=False,
            markup=False,
        )
    if unrouted:
        common.stderr.print(f"  {served[:1].upper()}{served[1:]}.", highlight=False, markup=False)
    raise typer.Exit(common.ExitCode.INVALID)


def _report(
    outcome: local_run.Outcome, files: local_run.RunFiles, seconds: float, prices: Prices
) -> common.ExitCode:
    counts = outcome.batch.counts
    if outcome.interrupted:
        common.stderr.print(
            f"Interrupted: {counts.terminal:,} of {counts.total:,} requests done. Run the same command again to "
            "continue where it stopped.",
            highlight=False,
            markup=False,
        )
        return common.ExitCode.INTERRUPTED
    failed = counts.failed + counts.canceled
    status = outcome.batch.status
    output = files.output if counts.completed else "none (no request completed)"
    errors_file = files.errors if failed else "none (no request failed)"
    lines = [
        f"{counts.total:,} requests: {counts.completed:,} completed, {failed:,} failed (batch {status}, "
        f"{seconds:.1f} s).",
        f"  output: {output}",
        f"  errors: {errors_file}",
    ]
    spent = tokens.summary(outcome.batch, prices)
    if spent is not None:
        lines.insert(1, f"  {spent}")
    common.stdout.print("\n".join(lines), highlight=False, markup=False)
    if not failed:
        return common.ExitCode.OK
    common.stderr.print(
        f"{failed:,} requests failed: their lines in {files.errors} say why. Once the cause is fixed, run the "
        "same command with --retry-failed to send them again.",
        highlight=False,
        markup=False,
    )
    return common.ExitCode.FAILED
