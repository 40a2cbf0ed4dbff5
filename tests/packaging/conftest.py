"""The packaging tier: the sdist and the wheel built from this checkout as a release would be (`python -m build`),
the wheel installed with its dependencies in a virtualenv of its own, and the installed `fusillade` run from
outside the checkout. Built and installed once per session (`installed`); it reaches PyPI for the build backend
and the dependencies, which pip's cache keeps quick after the first run. The deployment tests share `image`, the
Dockerfile's last stage (read by `recipes.dockerfile_stages`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.packaging.recipes import Stage, dockerfile_stages

CHECKOUT = Path(__file__).resolve().parents[2]
DOCKERFILE = CHECKOUT / "Dockerfile"

BUILD_WITHIN = 240.0
"""Seconds `python -m build` gets (two isolated environments, each fetching the build backend)."""
INSTALL_WITHIN = 420.0
"""Seconds `pip install` of the wheel gets: every dependency, from PyPI when pip's cache is cold."""
TIER_TIMEOUT = 900
"""pytest-timeout of every test that needs `installed`: the first one to ask pays for the build and install."""

# Variables that would let the checkout or the developer's virtualenv leak into the installed copy.
_LEAKY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")


def clean_environment(
    extra: Mapping[str, str] | None = None, *, bin_directory: Path | None = None
) -> dict[str, str]:
    """The test's environment without `FUSILLADE_*` and the variables that point Python elsewhere; with
    `bin_directory` first on PATH (as an activated virtualenv has it), plus `extra`."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("FUSILLADE_") and name not in _LEAKY
    }
    if bin_directory is not None:
        environment["PATH"] = os.pathsep.join([str(bin_directory), environment.get("PATH", "")])
    return {**environment, **(extra or {})}


def run(
    command: Sequence[str | Path],
    *,
    cwd: Path,
    within: float,
    environment: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `command` to its end (killed after `within` seconds: `subprocess.TimeoutExpired`), output captured."""
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=dict(environment if environment is not None else clean_environment()),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=within,
        check=False,
    )


def check(result: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    """`result`, or a failure showing what the command printed when it did not exit 0."""
    if result.returncode != 0:
        pytest.fail(
            f"{what} exited with {result.returncode}:\n--- stdout\n{result.stdout[-6000:]}\n"
            f"--- stderr\n{result.stderr[-6000:]}",
            pytrace=False,
        )
    return result


@dataclass(frozen=True)
class Installed:
    """The release artefacts and the virtualenv the wheel is installed in."""

    sdist: Path
    wheel: Path
    venv: Path
    workdir: Path
    """An empty directory outside the checkout, where the installed commands run."""

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def fusillade(self) -> Path:
        return self.bin / "fusillade"

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """What the installed commands run with: `clean_environment` with the virtualenv's bin first on PATH."""
        return clean_environment(extra, bin_directory=self.bin)

    def run(
        self, *arguments: str | Path, within: float = 60.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`fusillade ARGUMENTS` from the virtualenv, in `cwd` (default `workdir`)."""
        return run(
            [self.fusillade, *arguments], cwd=cwd or self.workdir, within=within, environment=self.environment()
        )

    def run_python(self, code: str, *, within: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`python -c CODE` with the virtualenv's interpreter, in `workdir`."""
        return run([self.python, "-c", code], cwd=self.workdir, within=within, environment=self.environment())


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`python -m build` of the checkout (the sdist, then the wheel built from the sdist), then a new virtualenv
    made by the base interpreter and `pip install` of the wheel alone into it."""
    root = tmp_path_factory.mktemp("packaging")
    assert not root.is_relative_to(CHECKOUT), f"the temporary directory {root} is inside the checkout"
    dist, venv, workdir = root / "dist", root / "venv", root / "work"
    workdir.mkdir()
    check(
        run([sys.executable, "-m", "build", "--outdir", dist, CHECKOUT], cwd=root, within=BUILD_WITHIN),
        "python -m build",
    )
    [sdist] = dist.glob("fusillade-*.tar.gz")
    [wheel] = dist.glob("fusillade-*.whl")
    # `python -m venv` run by a virtualenv's interpreter makes a virtualenv of the base interpreter: nothing of
    # the developer's .venv (site-packages, the editable install) is visible from it.
    check(run([sys.executable, "-m", "venv", venv], cwd=root, within=120.0), "python -m venv")
    check(
        run(
            [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-input", wheel],
            cwd=root,
            within=INSTALL_WITHIN,
            environment=clean_environment({"PIP_DISABLE_PIP_VERSION_CHECK": "1"}),
        ),
        "pip install of the wheel",
    )
    return Installed(sdist=sdist, wheel=wheel, venv=venv, workdir=workdir)


@pytest.fixture(scope="module")
def image() -> Stage:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert len(stages) >= 2, "a builder stage and the image"
    return stages[-1]
