"""A deployment as an operator runs it (docs/operations.md): `fusillade api` and one or more `fusillade daemon`
processes, each started from the same TOML configuration file, on one database.

The processes are `tests.support.processes` ones: a log file each in the test's directory and no `FUSILLADE_*`
variable in their environment, so only the configuration file steers them. `Deployment.stop()` ends every
process still running, all at once (SIGTERM, then SIGKILL); `Process.kill()` is the crash of one replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tests.support.processes import START_WITHIN, Process, Processes, ReadyCheck


def config_text(
    database_url: str, upstream_url: str, limits: Mapping[str, int], daemon: Mapping[str, str | int]
) -> str:
    """The configuration file shared by every process: the database, `[daemon]` knobs, one route per model."""
    lines = [f'database_url = "{database_url}"', "", "[daemon]"]
    lines += [
        f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"' for key, value in daemon.items()
    ]
    for model, limit in limits.items():
        lines += ["", f'[models."{model}"]', f'base_url = "{upstream_url}"', f"concurrency = {limit}"]
    return "\n".join(lines) + "\n"


class Deployment(Processes):
    """The processes of one test, each started from `config` (a TOML file in `directory`); peers, stopped all at
    once."""

    def __init__(self, directory: Path, config: Path) -> None:
        super().__init__(directory, stop_together=True)
        self.config = config

    async def migrate(self) -> None:
        """`fusillade migrate`; fails the test on a non-zero exit."""
        code, stdout, stderr = await self.cli("migrate", "--config", str(self.config), within=START_WITHIN)
        assert code == 0, f"fusillade migrate: {stdout}{stderr}"

    async def start_api(self, name: str = "api", *, check: ReadyCheck | None = None) -> tuple[Process, str]:
        """`fusillade api --port 0`; the process and its URL once `/readyz` answers 200 (`Process.ready`)."""
        return await self.serve("--config", str(self.config), command="api", name=name, check=check)

    def start_daemon(self, name: str, *arguments: str) -> Process:
        """`fusillade daemon ARGUMENTS`, started; `Process.registered()` waits until it has registered."""
        return self.start(name, "daemon", "--config", str(self.config), *arguments)
