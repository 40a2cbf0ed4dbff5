"""The `fusillade` command line: one module per command (`serve` also holds `api` and `daemon`).

Every command that touches the database takes `--config PATH` (or `FUSILLADE_CONFIG`) and reads the
`FUSILLADE_*` variables; `docs/cli.md` lists every command and option, and `cli.common` the exit codes.
"""

from __future__ import annotations

import typer

from fusillade import __version__
from fusillade.cli import keys, migrate, mock, run, serve, status

app = typer.Typer(
    help="fusillade: durable batches of LLM requests, the OpenAI Batch API on your own upstreams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command()(serve.serve)
app.command()(serve.api)
app.command()(serve.daemon)
app.command("run")(run.run)
app.command()(migrate.migrate)
app.command()(status.status)
app.add_typer(keys.commands, name="keys")
app.command("mock-upstream", context_settings=mock.SETTINGS, add_help_option=False)(mock.mock_upstream)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    app()
