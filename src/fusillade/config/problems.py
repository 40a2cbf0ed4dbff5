"""How configuration mistakes are reported: every problem at once, each as `<where>: <key>: <what to do>`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fusillade import errors

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake in the configuration."""

    source: str
    """Where the bad value came from: the file's path, or the name of an environment variable."""
    key: str
    """The dotted key as it would be written in TOML (`daemon.retry.max_delay`, `models."gpt-4o".base_url`);
    empty when the problem is the whole source (a TOML syntax error, a missing file)."""
    message: str
    """What is wrong and how to fix it; never quotes a secret."""

    def __str__(self) -> str:
        return ": ".join(part for part in (self.source, self.key, self.message) if part)


class InvalidConfiguration(errors.ConfigurationError):
    """The configuration has mistakes; `problems` lists every one, and so does the message (one a line)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        heading = "The configuration has a problem:" if count == 1 else f"The configuration has {count} problems:"
        super().__init__("\n".join([heading, *(f"  {problem}" for problem in self.problems)]))


def dotted_key(location: Iterable[str | int]) -> str:
    """`("models", "gpt-4o", "timeouts", "idle")` -> `models.gpt-4o.timeouts.idle`; a segment that is not a bare
    TOML key is quoted (`models."org/model"`), a list index is written `[0]`."""
    text = ""
    for segment in location:
        if isinstance(segment, int):
            text += f"[{segment}]"
            continue
        part = segment if _BARE_KEY.fullmatch(segment) else json.dumps(segment, ensure_ascii=False)
        text = f"{text}.{part}" if text else part
    return text
