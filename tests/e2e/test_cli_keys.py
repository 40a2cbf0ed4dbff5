"""`fusillade keys` and `fusillade status` on their own: what they print, and how they fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fusillade import __version__


def fusillade(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusillade", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_key_is_printed_once_listed_by_prefix_and_revoked(tmp_path: Path) -> None:
    created = fusillade("keys", "create", "--owner", "alice", "--name", "laptop", "--admin", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert key.startswith("fus_") and len(key) > 30
    assert created.stdout.endswith(f"{key}\n") and key == key.strip()  # alone on the last line of stdout
    assert created.stdout.count(key) == 1
    assert "cannot be shown again" in created.stderr
    assert key not in created.stderr

    listed = fusillade("keys", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert (entry["owner"], entry["name"], entry["admin"], entry["revoked_at"]) == ("alice", "laptop", True, None)
    assert key.startswith(entry["prefix"]) and key != entry["prefix"]
    assert key not in listed.stdout

    table = fusillade("keys", "list", cwd=tmp_path)
    assert entry["id"] in table.stdout and "laptop" in table.stdout

    revoked = fusillade("keys", "revoke", entry["id"], cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    [entry] = json.loads(fusillade("keys", "list", "--json", cwd=tmp_path).stdout)
    assert entry["revoked_at"] is not None


def test_keys_commands_explain_bad_arguments(tmp_path: Path) -> None:
    no_owner = fusillade("keys", "create", "--owner", " ", cwd=tmp_path)
    assert no_owner.returncode == 2
    assert "--owner must name an owner" in no_owner.stderr

    not_an_id = fusillade("keys", "revoke", "fus_abc", cwd=tmp_path)
    assert not_an_id.returncode == 2
    assert "is not a key id" in not_an_id.stderr

    unknown = fusillade("keys", "revoke", "0" * 32, cwd=tmp_path)
    assert unknown.returncode == 1
    assert "error:" in unknown.stderr


def test_status_of_an_empty_database(tmp_path: Path) -> None:
    result = fusillade("status", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No routes: the configuration serves no model." in result.stdout
    assert "No batches yet." in result.stdout
    assert "No daemon has run on this database yet." in result.stdout

    as_json = json.loads(fusillade("status", "--json", cwd=tmp_path).stdout)
    assert as_json == {"database_url": "sqlite:///./fusillade.db", "routes": [], "batches": [], "daemons": []}


def test_version_and_mock_upstream_help(tmp_path: Path) -> None:
    assert fusillade("version", cwd=tmp_path).stdout.strip() == __version__
    mock_help = fusillade("mock-upstream", "--help", cwd=tmp_path)
    assert mock_help.returncode == 0
    assert "--latency-ms" in mock_help.stdout and "--error-rate" in mock_help.stdout
