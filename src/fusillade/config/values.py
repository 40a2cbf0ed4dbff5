"""The value types of the configuration (durations, counts, prices, URLs, names) with their checks, and the base
of its tables (`Section`): shared by `schema` (the root and the daemon's tables) and `routes` (a model's table)."""

from __future__ import annotations

import re
import tempfile
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
)

from fusillade.config import units

_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


# ----------------------------------------------------------------------------------------------- value types


def _positive(duration: timedelta) -> timedelta:
    if duration <= timedelta(0):
        raise ValueError("must be longer than 0s")
    return duration


def _positive_or_none(duration: timedelta | None) -> timedelta | None:
    if duration is not None and duration <= timedelta(0):
        raise ValueError('must be longer than 0s; write "none" for no limit')
    return duration


def none_word(value: object) -> object:
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


def _env_var_name(name: str) -> str:
    # Never quote the value back: it may be a key pasted in the wrong place.
    if name.startswith("sk-"):
        raise ValueError(
            "holds what looks like an API key itself, and keys never go in the configuration: put the key "
            "in an environment variable (export OPENAI_API_KEY=...) and write the variable's name here "
            '("OPENAI_API_KEY")'
        )
    if not _ENV_VAR_NAME.fullmatch(name):
        raise ValueError(
            "must be the name of an environment variable (letters, digits and underscores, not starting with a "
            'digit), such as "OPENAI_API_KEY"; the key itself goes in that variable'
        )
    return name


def _base_url(url: str) -> str:
    if "@" in url:
        raise ValueError(
            "must not hold a user name or password; put the upstream's key in an environment variable and name "
            "that variable in api_key_env"
        )
    hint = "write it as http://HOST:PORT or https://HOST/PATH, such as https://api.openai.com/v1"
    if url != url.strip() or any(character.isspace() for character in url):
        raise ValueError(f"{url!r} must not contain spaces; {hint}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it validates it)
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL ({exc}); {hint}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL; {hint}")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r} must not have a query (?...) or a fragment (#...); {hint}")
    return url


def _base_urls(value: object) -> object:
    """One URL, or a list of them (a pool of endpoints: at least one, each once), each checked as `_base_url`."""
    if isinstance(value, str):
        return _base_url(value)
    if not isinstance(value, list | tuple):
        raise ValueError("must be a URL in quotes, or a list of them (the endpoints of a pool)")
    if not value:
        raise ValueError("is an empty list; write one URL, or a list of the endpoints of a pool")
    urls = []
    for number, url in enumerate(value, start=1):
        if not isinstance(url, str):
            raise ValueError(f"endpoint {number} of the list is not a URL in quotes")
        try:
            urls.append(_base_url(url))
        except ValueError as exc:
            raise ValueError(f"endpoint {number} of the list: {exc}") from None
    repeated = next((url for index, url in enumerate(urls) if url in urls[:index]), None)
    if repeated is not None:
        raise ValueError(f"lists {repeated!r} twice; write each endpoint of a pool once")
    return tuple(urls)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def listen_address(address: str) -> str:
    hint = "write it HOST:PORT, such as 127.0.0.1:9100 or [::1]:9100"
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not an address to listen on; {hint}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{address!r}: an IPv6 address goes in brackets; {hint}")
    return address


def header_key(key: str) -> str:
    if not _HEADER_TOKEN.fullmatch(key):
        raise ValueError(
            f"{key!r} cannot be part of an HTTP header name (x-fusillade-batch-<key>); use letters, digits and -_."
        )
    return key


def existing_directory(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(
            f"{str(path)!r} is not an existing directory; create it, or leave spool_directory out to use the "
            f"system's temporary directory ({tempfile.gettempdir()})"
        )
    return path


Duration = Annotated[
    timedelta,
    BeforeValidator(units.parse_duration),
    PlainSerializer(units.format_duration, return_type=str, when_used="json"),
]
"""A non-negative duration: `"250ms"`, `"5s"`, `"10m"`, `"1h30m"`, or a bare number of seconds."""
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
OptionalPositiveDuration = Annotated[
    timedelta | None,
    BeforeValidator(units.parse_optional_duration),
    AfterValidator(_positive_or_none),
    PlainSerializer(units.format_optional_duration, return_type=str, when_used="json"),
]
"""A positive duration, or `"none"` for no limit."""
Count = Annotated[int, Field(ge=1)]
Price = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
ByteSize = Annotated[
    int,
    BeforeValidator(units.parse_byte_size),
    Field(ge=1),
    PlainSerializer(units.format_byte_size, return_type=str, when_used="json"),
]
"""A number of bytes, or a size such as `"200MiB"`."""
EnvVarName = Annotated[str, AfterValidator(_env_var_name)]
"""The NAME of an environment variable that holds a secret (never the secret)."""
BaseUrl = Annotated[str, AfterValidator(_base_url)]
BaseUrls = Annotated[str | tuple[str, ...], BeforeValidator(_base_urls)]
"""One base URL, or a list of them: the endpoints of a pool."""
ModelName = Annotated[str, Field(min_length=1)]


# -------------------------------------------------------------------------------------------------- sections


class Section(BaseModel):
    """A table of the configuration file: immutable, unknown keys refused, attribute docstrings as help."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
