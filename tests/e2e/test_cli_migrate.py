"""`fusillade migrate` as a user runs it: a subprocess on a real database file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*arguments: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusillade", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_migrate_creates_the_schema_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fusillade.db'}"
    first = run_cli("migrate", "--database-url", url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "migration(s): 0001_initial" in first.stdout
    assert (tmp_path / "fusillade.db").exists()

    second = run_cli("migrate", "--database-url", url, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


def test_migrate_defaults_to_a_sqlite_file_in_the_working_directory(tmp_path: Path) -> None:
    result = run_cli("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fusillade.db").exists()


def test_migrate_reads_the_database_url_from_the_configuration_file(tmp_path: Path) -> None:
    (tmp_path / "fusillade.toml").write_text('database_url = "sqlite:///./from-the-file.db"\n')
    result = run_cli("migrate", "--config", "fusillade.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-the-file.db").exists()


def test_migrate_explains_an_unsupported_url_given_as_an_option(tmp_path: Path) -> None:
    result = run_cli("migrate", "--database-url", "mysql://localhost/x", cwd=tmp_path)
    assert result.returncode == 2
    assert "--database-url: database_url: has an unsupported scheme 'mysql'" in result.stderr
    assert "sqlite:///" in result.stderr


def test_migrate_names_the_variable_holding_a_bad_url(tmp_path: Path) -> None:
    env = {**os.environ, "FUSILLADE_DATABASE_URL": "mysql://localhost/x"}
    result = run_cli("migrate", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "FUSILLADE_DATABASE_URL: database_url: has an unsupported scheme" in result.stderr
