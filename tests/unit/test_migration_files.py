"""The files the migration runner reads (`storage.migrate`): database functions with their version header, and
migrations of comments alone (recorded, not run)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusillade.storage import migrate
from fusillade.storage.postgres import migration

PACKAGE = "fusillade_test_functions"


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable package directory of this test alone, for function files."""
    directory = tmp_path / PACKAGE
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield directory
    sys.modules.pop(PACKAGE, None)


def test_the_shipped_claim_function_says_its_version() -> None:
    functions = migrate.load_functions(migration.FUNCTIONS_PACKAGE)

    assert [function.name for function in functions] == ["claim_requests"]
    (claim,) = functions
    assert claim.version >= 2  # 1 and 2 were written in migrations 0001 and 0003
    assert "CREATE OR REPLACE FUNCTION claim_requests(" in claim.sql


def test_a_function_file_is_read_with_the_version_of_its_header(package: Path) -> None:
    (package / "b_function.sql").write_text("-- b\n--   version: 12\n\nCREATE OR REPLACE FUNCTION b_function()\n")
    (package / "a_function.sql").write_text("-- version: 3\nCREATE OR REPLACE FUNCTION a_function()\n")
    (package / "notes.txt").write_text("-- version: 9\n")

    found = migrate.load_functions(PACKAGE)

    assert [(function.name, function.version) for function in found] == [("a_function", 3), ("b_function", 12)]


@pytest.mark.parametrize(
    "text",
    [
        "CREATE OR REPLACE FUNCTION f() ...\n",
        "-- f, no version here\nCREATE OR REPLACE FUNCTION f() ...\n",
        "-- f\nCREATE OR REPLACE FUNCTION f() ...\n-- version: 2\n",  # not in the header
    ],
    ids=["no-header", "header-without-version", "version-after-the-code"],
)
def test_a_function_file_without_a_version_in_its_header_is_refused(package: Path, text: str) -> None:
    (package / "f.sql").write_text(text)

    with pytest.raises(RuntimeError, match="does not say its version"):
        migrate.load_functions(PACKAGE)


@pytest.mark.parametrize(
    ("sql", "has_code"),
    [
        ("-- moved to functions/\n-- nothing left here\n", False),
        ("\n  -- indented comment\n\n", False),
        ("-- a comment\nCREATE TABLE t (x int); -- trailing\n", True),
        ("SELECT 1", True),
    ],
)
def test_a_migration_of_comments_alone_has_no_code(sql: str, has_code: bool) -> None:
    assert migrate.Migration(1, "0001_x", sql).has_code is has_code


def test_the_postgres_migrations_that_moved_their_function_out_have_no_code() -> None:
    by_name = {found.name: found for found in migrate.load_migrations(migration.MIGRATIONS_PACKAGE)}

    assert not by_name["0003_claim_fast_path"].has_code
    assert by_name["0001_initial"].has_code
    assert all("claim_requests(" not in found.sql for found in by_name.values())
