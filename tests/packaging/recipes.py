"""What the deployment tests (`test_deploy.py`, `test_deploy_docs.py`) share: command lines checked by the CLI's
own parser (`check_cli`), the Dockerfile read into its stages and their environment, the routes the HTTP API
answers GET on, and the values the recipes are checked against (the shell's variables, the shutdown graces)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import pytest

from fusillade.api.app import create_app
from fusillade.api.context import ApiContext
from fusillade.composition import serving
from fusillade.config import load_config
from tests.packaging.commands import UsageError, parse

SHELL = {"FUSILLADE_ADMIN_KEY": "an-admin-key-from-the-shell"}
"""The variables of the shell that runs `docker compose` or `docker run` in these tests."""
HTTP_DRAIN = timedelta(seconds=serving.HTTP_SHUTDOWN_GRACE)
DEFAULTS = load_config(None, environ={})


def api_routes() -> set[str]:
    """The paths the HTTP API answers GET on, from its OpenAPI schema. The app is built without a context: its
    routes need one only when they are called."""
    schema = create_app(cast(ApiContext, None)).openapi()
    return {path for path, operations in schema["paths"].items() if "get" in operations}


def fusillade_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after the program of a `fusillade` command line (`fusillade`, `/opt/.../bin/fusillade`);
    None when `argv` runs something else."""
    if argv and (argv[0] == "fusillade" or argv[0].endswith("/bin/fusillade")):
        return argv[1:]
    return None


def check_cli(argv: list[str]) -> Any:
    """`argv` must run fusillade, with arguments its parser accepts; the parsed context."""
    arguments = fusillade_arguments(argv)
    assert arguments is not None, f"{argv} does not run fusillade"
    try:
        return parse(arguments)
    except UsageError as error:
        pytest.fail(f"`{shlex.join(argv)}` is refused by the CLI: {error.format_message()}", pytrace=False)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for name, arguments in self.instructions if name == keyword]

    def one(self, keyword: str) -> str:
        [arguments] = self.all(keyword)
        return arguments


def dockerfile_stages(text: str) -> list[Stage]:
    """The build stages of a Dockerfile: its instructions with continuation lines joined and comments left out,
    `ARG` defaults substituted in `FROM`."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert current == "", "the Dockerfile ends in a continuation line"
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in logical:
        keyword, _, rest = instruction.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            arguments[name] = default
        elif keyword == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda match: arguments[match.group(1)], rest.split()[0])
            words = rest.split()
            stages.append(Stage(base, words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def dockerfile_environment(stage: Stage) -> dict[str, str]:
    environment: dict[str, str] = {}
    for arguments in stage.all("ENV"):
        for word in shlex.split(arguments):
            name, equals, value = word.partition("=")
            assert equals, f"ENV {arguments}: write NAME=value"
            environment[name] = value
    return environment
