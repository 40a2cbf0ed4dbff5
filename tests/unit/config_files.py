"""Configuration files for the configuration tests (`test_config*.py`): `write` puts a TOML text in the test's
directory, `ROUTE` is the smallest model table."""

from __future__ import annotations

import textwrap
from pathlib import Path

ROUTE = """
[models.m]
base_url = "http://127.0.0.1:9000/v1"
"""


def write(tmp_path: Path, text: str, name: str = "fusillade.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path
