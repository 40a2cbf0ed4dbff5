"""The deployment examples of the documents and the Makefile, checked without Docker or Kubernetes: every
`fusillade` command line of the shell blocks of docs/deploy.md and README.md is read by the CLI's own parser, the
documented `docker run`s of the server give it an admin key, the Kubernetes manifests probe real routes and leave
the processes their shutdown grace, local links lead to files that exist, and `make serve`/`make lint` run what
they should. The Dockerfile, Compose and systemd recipes are in `test_deploy.py`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fusillade.config import load_config
from tests.packaging.commands import command_names
from tests.packaging.conftest import CHECKOUT, clean_environment
from tests.packaging.recipes import (
    DEFAULTS,
    HTTP_DRAIN,
    SHELL,
    Stage,
    api_routes,
    check_cli,
    dockerfile_environment,
    fusillade_arguments,
)

pytestmark = pytest.mark.packaging

DOCUMENTS = [CHECKOUT / "docs" / "deploy.md", CHECKOUT / "README.md"]


# ------------------------------------------------------------------------------------- docs and README


def code_blocks(path: Path, *languages: str) -> Iterator[str]:
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL):
        if match.group(1) in languages:
            yield match.group(2)


def shell_commands(block: str) -> Iterator[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at `&&`, `|`,
    `;` and `&`."""
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in lexer:
            if token and set(token) <= set("&|;()<>"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


def documented_fusillade_commands(path: Path) -> Iterator[list[str]]:
    """Every `fusillade COMMAND ...` of the document's shell blocks, also inside `docker run`, `docker exec`,
    `sudo ...`: from the program to the end of the simple command."""
    names = command_names()
    for block in code_blocks(path, "bash", "sh", "shell", "console"):
        for command in shell_commands(block):
            for index, word in enumerate(command[:-1]):
                following = command[index + 1]
                is_program = word == "fusillade" or word.endswith("/bin/fusillade")
                if is_program and re.fullmatch(r"[a-z][a-z-]*", following) and following != "fusillade":
                    assert following in names, f"{path.name}: `{shlex.join(command)}`: no command {following!r}"
                    yield ["fusillade", *command[index + 1 :]]
                    break


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_documented_commands_are_accepted_by_the_cli(
    document: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = list(documented_fusillade_commands(document))
    # `run FILE` wants an existing file: the examples' files, empty, in a directory of the test's own.
    monkeypatch.chdir(tmp_path)
    for command in commands:
        for word in command:
            if word.endswith(".jsonl"):
                (tmp_path / word).touch()

    for command in commands:
        check_cli(command)
    assert len(commands) >= 4, commands


def docker_runs(path: Path) -> Iterator[list[str]]:
    for block in code_blocks(path, "bash"):
        for command in shell_commands(block):
            if command[:2] == ["docker", "run"]:
                yield command


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_documented_docker_runs_of_the_server_give_it_an_admin_key(document: Path, image: Stage) -> None:
    """The image's server listens on 0.0.0.0, where it refuses to start without a key."""
    servers = 0
    for command in docker_runs(document):
        arguments = (
            fusillade_arguments(command[command.index("fusillade", 2) + 1 :]) or json.loads(image.one("CMD"))[1:]
        )
        if check_cli(["fusillade", *arguments]).info_name not in ("serve", "api"):
            continue
        servers += 1
        given = [command[index + 1] for index, word in enumerate(command) if word in ("-e", "--env")]
        environment = {**dockerfile_environment(image)}
        for assignment in given:
            name, equals, value = assignment.partition("=")
            environment[name] = value if equals else SHELL[name]
        # The configuration file such a command mounts is the reader's own: only the variables are checked.
        environment.pop("FUSILLADE_CONFIG", None)
        config = load_config(None, environ=environment)
        assert config.admin_key(environment) == SHELL["FUSILLADE_ADMIN_KEY"], shlex.join(command)
    assert servers >= 1


def manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for block in code_blocks(CHECKOUT / "docs" / "deploy.md", "yaml"):
        documents.extend(document for document in yaml.safe_load_all(block) if document)
    return documents


def pod_spec(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return dict(manifest["spec"]["template"]["spec"])


def test_kubernetes_examples_run_commands_that_parse_with_probes_on_real_routes(image: Stage) -> None:
    routes, probes, kinds = api_routes(), [], []
    uid = int(image.one("USER").split(":")[0])
    for manifest in manifests():
        kinds.append(manifest["kind"])
        spec = pod_spec(manifest)
        for container in spec["containers"]:
            started = check_cli([*container["command"], *container.get("args", [])]).info_name
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    path = container[probe]["httpGet"]["path"]
                    assert path in routes, f"{probe} asks {path}, not a route of the API"
                    probes.append((probe, path))
            if started in ("serve", "daemon", "api"):
                needed = {"serve": DEFAULTS.daemon.shutdown_grace + HTTP_DRAIN, "api": HTTP_DRAIN}.get(
                    started, DEFAULTS.daemon.shutdown_grace
                )
                grace = timedelta(seconds=spec["terminationGracePeriodSeconds"])
                assert grace > needed, f"{manifest['metadata']['name']}: {grace} leaves too little to stop"
                assert spec["securityContext"]["runAsUser"] == uid
    assert sorted(kinds) == ["Deployment", "Deployment", "Job"]
    assert ("livenessProbe", "/healthz") in probes and ("readinessProbe", "/readyz") in probes


@pytest.mark.parametrize("document", [*DOCUMENTS, CHECKOUT / "docs" / "operations.md"], ids=lambda path: path.name)
def test_documents_link_to_files_that_exist(document: Path) -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text())
    local = [target for target in targets if not re.match(r"\w+://", target)]

    missing = [target for target in local if not (document.parent / target).exists()]
    assert missing == []
    assert local


# ------------------------------------------------------------------------------------------------ Makefile


def make_dry_run(*arguments: str) -> list[str]:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", *arguments],
        cwd=CHECKOUT,
        # HOST and PORT of the caller's environment would be taken as the Makefile's defaults.
        env={name: value for name, value in clean_environment().items() if name not in ("HOST", "PORT")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    ("variables", "host", "port"), [((), "127.0.0.1", 8080), (("PORT=9000",), "127.0.0.1", 9000)]
)
def test_make_serve_takes_a_port(variables: tuple[str, ...], host: str, port: int) -> None:
    [line] = [line for line in make_dry_run("serve", *variables) if " -m fusillade serve" in line]
    words = shlex.split(line)

    context = check_cli(["fusillade", *words[words.index("fusillade") + 1 :]])

    assert (context.params["host"], context.params["port"], context.params["mock_upstream"]) == (host, port, True)


def test_make_lint_runs_hadolint_on_the_dockerfile() -> None:
    assert any(re.search(r"hadolint Dockerfile$", line) for line in make_dry_run("lint"))
