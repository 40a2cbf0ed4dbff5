"""`fusillade mock-upstream`: the fake OpenAI-compatible upstream as a process, for demos and benchmarks."""

from __future__ import annotations

import typer

from fusillade.mock_upstream import command


def mock_upstream(context: typer.Context) -> None:
    """A fake OpenAI-compatible upstream, for demos and benchmarks.

    Prints its URL on the first line; `--help` lists its options (latency, error rates, faults).
    """
    raise typer.Exit(command.main(context.args))


SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
"""Every argument, `--help` included, goes to the fake upstream's own parser."""
