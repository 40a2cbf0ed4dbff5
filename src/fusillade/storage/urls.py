"""Database URLs: which ones name a backend, and the SQLite file one names. No backend is imported here, so the
configuration checks a URL (`config.schema`) by the rules `factory.open_storage` opens it by, without importing
a database driver.
"""

from __future__ import annotations

from pathlib import Path

from fusillade import errors

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
DEFAULT_DATABASE_URL = "sqlite:///./fusillade.db"


def is_sqlite(url: str) -> bool:
    return url.startswith(SQLITE_PREFIX)


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES_PREFIXES)


def check_database_url(url: str) -> str:
    """`url` itself if a backend can open it; ValueError saying how to write it otherwise. The message never
    quotes the URL back: it may carry a password."""
    if is_sqlite(url):
        if url == SQLITE_PREFIX:
            raise ValueError(
                "names no database file; write sqlite:///./fusillade.db (relative to the working directory) or "
                "sqlite:////absolute/path.db"
            )
        return url
    if is_postgres(url):
        return url
    scheme = url.partition("://")[0] if "://" in url else "(none)"
    raise ValueError(
        f"has an unsupported scheme {scheme!r}; use sqlite:///PATH (the default is {DEFAULT_DATABASE_URL}) or "
        "postgresql://USER@HOST:PORT/DATABASE"
    )


def sqlite_path(url: str) -> Path:
    """`sqlite:///./fusillade.db` -> `./fusillade.db`; `sqlite:////var/lib/f.db` -> `/var/lib/f.db`;
    `ConfigurationError` for a URL that names no file."""
    path = url.removeprefix(SQLITE_PREFIX)
    if not path:
        raise errors.ConfigurationError(
            f"The database URL {url!r} names no file; write it as sqlite:///./fusillade.db "
            "(relative) or sqlite:////absolute/path.db."
        )
    return Path(path)
