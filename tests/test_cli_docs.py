"""docs/cli.md against the command line itself: every command has a section, each section's synopsis lists
exactly the options of `--help` with the same value names, option tables name real options, and every example
command is accepted by the CLI's own parser. Also what `--help` looks like: plain sentences, no `<bool>`."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer._click.core import Command as ClickCommand
from typer._click.core import Context
from typer.core import TyperArgument, TyperGroup, TyperOption

from fusillade.cli.main import app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
ROOT = typer.main.get_command(app)

_HEADING = re.compile(r"^## `fusillade (?P<name>[a-z -]+)`$", re.MULTILINE)
_BLOCK = re.compile(r"^```bash\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
# `--option` with its value names (upper-case words) as the synopsis writes them: `[--port PORT]`,
# `--latency-uniform-ms MIN MAX`, `[--output OUT]`.
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)((?: [A-Z][A-Za-z0-9_|.=,-]*)*)")
_TABLE_OPTION = re.compile(r"^\| `(--[a-z][a-z-]*)[^`]*`(?:, `(-[a-z])`)? \|", re.MULTILINE)


@dataclass(frozen=True)
class Command:
    path: str
    """As typed after `fusillade`: "run", "keys create"."""
    command: ClickCommand


def commands(group: TyperGroup = ROOT, prefix: str = "") -> list[Command]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            found.extend(commands(command, f"{prefix}{name} "))
        else:
            found.append(Command(f"{prefix}{name}", command))
    return found


def options(command: ClickCommand) -> dict[str, str]:
    """Long option -> the value names `--help` shows ("" for a flag)."""
    shown = {}
    for parameter in command.params:
        if isinstance(parameter, TyperOption):
            long = max(parameter.opts, key=len)
            shown[long] = "" if parameter.is_flag else (parameter.metavar or "?")
    return shown


def sections() -> dict[str, str]:
    text = DOCS.read_text(encoding="utf-8")
    headings = list(_HEADING.finditer(text))
    return {
        heading["name"]: text[heading.end() : following.start() if following else len(text)]
        for heading, following in zip(headings, [*headings[1:], None], strict=True)
    }


def section_of(path: str) -> str:
    """`keys create` is documented in the `keys` section."""
    found = sections()
    return found.get(path) or found[path.split()[0]]


def synopsis(path: str) -> str:
    """The synopsis line(s) of a command: those of the section's first bash block that start with it."""
    first = _BLOCK.search(section_of(path))
    assert first is not None, f"the section of `fusillade {path}` has no ```bash synopsis"
    lines: list[str] = []
    for line in first["body"].splitlines():
        if line.startswith("fusillade "):
            lines.append(line)
        elif line.startswith(" ") and lines:
            lines[-1] += " " + line.strip()
    wanted = [line for line in lines if line.startswith(f"fusillade {path} ") or line == f"fusillade {path}"]
    assert wanted, f"no synopsis `fusillade {path} ...` in its section"
    return " ".join(wanted)


def test_every_command_has_a_section_and_an_index_entry() -> None:
    documented = set(sections())
    text = DOCS.read_text(encoding="utf-8")
    for command in commands():
        top = command.path.split()[0]
        assert top in documented or command.path == "version", f"no section for `fusillade {command.path}`"
        assert f"`{command.path}`" in text or f"`{top}`" in text
    assert documented <= {command.path.split()[0] for command in commands()}, "a section for no command"


@pytest.mark.parametrize("command", [c for c in commands() if c.path != "version"], ids=lambda c: c.path)
def test_the_synopsis_lists_the_options_of_help(command: Command) -> None:
    written = {name: names.strip() for name, names in _OPTION.findall(synopsis(command.path))}
    assert written == options(command.command)
    for argument in (p for p in command.command.params if isinstance(p, TyperArgument)):
        assert f" {argument.metavar} " in f"{synopsis(command.path)} "


@pytest.mark.parametrize("command", [c for c in commands() if c.path != "version"], ids=lambda c: c.path)
def test_option_tables_name_real_options_with_their_short_forms(command: Command) -> None:
    shorts = {
        max(p.opts, key=len): {opt for opt in p.opts if not opt.startswith("--")}
        for p in command.command.params
        if isinstance(p, TyperOption)
    }
    shared = {"--config", "--database-url", "--log-level"}  # in the table of shared options, at the top
    for long, short in _TABLE_OPTION.findall(section_of(command.path)):
        if command.path.startswith("keys"):
            break  # one section for three commands: the synopsis test covers them
        assert long in shorts or long in shared, f"`{long}` is not an option of `fusillade {command.path}`"
        if short and long in shorts:
            assert short in shorts[long]


def example_commands() -> list[str]:
    """Every command line of docs/cli.md's bash blocks that is not a synopsis (no `[`, no `|` choice)."""
    found = []
    for block in _BLOCK.finditer(DOCS.read_text(encoding="utf-8")):
        for line in block["body"].splitlines():
            if line.startswith("fusillade ") and "[" not in line and " | " not in line:
                found.append(line)
    return found


@pytest.mark.parametrize("line", example_commands())
def test_example_commands_are_accepted_by_the_parser(
    line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arguments = shlex.split(line.split(" #")[0])[1:]
    monkeypatch.chdir(tmp_path)
    for argument in arguments:  # the input files the examples name must exist for the parser
        if argument.endswith(".jsonl") and not argument.startswith("-"):
            (tmp_path / argument).touch()
    command: ClickCommand = ROOT
    while isinstance(command, TyperGroup):
        assert arguments and arguments[0] in command.commands, f"no command {arguments[:1]} in: {line}"
        command, arguments = command.commands[arguments[0]], arguments[1:]
    with command.make_context("fusillade", arguments):  # raises UsageError for an unknown option or a bad value
        pass


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.path)
def test_help_is_plain_sentences_without_type_placeholders(command: Command) -> None:
    context = Context(command.command, info_name=f"fusillade {command.path}", terminal_width=80)
    text = command.command.get_help(context)
    assert "<bool>" not in text, text  # a flag takes no value
    options_part = text.split("Options:")[-1]
    assert not re.search(r"<(str|int|float|path|file)[^>]*>", options_part), text  # a value has a name
    assert "\x1b[" not in text and "╭" not in text  # no colours, no boxes
    assert all(len(line) <= 80 for line in text.splitlines()), text
    description = command.command.help or ""
    first = description.split("\n\n")[0]
    assert first.endswith("."), f"the first paragraph of `fusillade {command.path} --help` is not a sentence"
    assert "\n" not in first.strip() or all(
        not line.strip().startswith(("or ", "and ")) for line in first.splitlines()
    )


def test_the_command_list_shows_whole_sentences() -> None:
    context = Context(ROOT, info_name="fusillade", terminal_width=80)
    listing = ROOT.get_help(context).split("Commands:")[1]
    assert "..." not in listing, listing
