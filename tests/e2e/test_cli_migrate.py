"""`fusillade migrate` as a user runs it: a subprocess on a real database file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusillade", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_migrate_creates_the_schema_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fusillade.db'}"
    first = run_cli("migrate", "--database-url", url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied 2 migration(s): 0001_initial, 0002_api_keys" in first.stdout
    assert (tmp_path / "fusillade.db").exists()

    second = run_cli("migrate", "--database-url", url, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


def test_migrate_defaults_to_a_sqlite_file_in_the_working_directory(tmp_path: Path) -> None:
    result = run_cli("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fusillade.db").exists()


def test_migrate_explains_an_unsupported_url(tmp_path: Path) -> None:
    result = run_cli("migrate", "--database-url", "mysql://localhost/x", cwd=tmp_path)
    assert result.returncode == 1
    assert "Unsupported database URL" in result.stderr
    assert "sqlite:///" in result.stderr
