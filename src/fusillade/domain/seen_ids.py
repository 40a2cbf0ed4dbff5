"""The custom_ids of one input file read so far, and the line each was first seen on: what `jsonl.validate`
needs to refuse a custom_id used twice, and the one thing in a file's validation that grows with the file.

`SeenIds` is what the validator asks; `IdsInMemory`, a dict, is its default (about 150 bytes an id: 150 MB for a
million lines). The service validates uploads with `service.SpilledIds` instead, which keeps the ids in a
temporary database on disk past the first 50,000, so that memory stays flat however long the file is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class SeenIds(Protocol):
    """custom_id -> the line it was first seen on, for one file read in order."""

    @property
    def batched(self) -> bool:
        """Whether a look-up costs much more than each id it holds (a trip to a database): the validator then
        asks about many lines at once (`jsonl.SETTLE_LINES`)."""
        ...

    def first_lines(self, ids: Sequence[tuple[str, int]]) -> list[int]:
        """For each `(custom_id, line)` of `ids`, which come in file order after every id given before, the line
        the id was first seen on: `line` itself when it is new. The new ids are added."""
        ...

    def close(self) -> None:
        """Free what the ids hold (idempotent); they are not used after."""
        ...


class IdsInMemory:
    """`SeenIds` in a dict."""

    batched = False

    def __init__(self) -> None:
        self._lines: dict[str, int] = {}

    def first_lines(self, ids: Sequence[tuple[str, int]]) -> list[int]:
        lines = self._lines
        return [lines.setdefault(custom_id, line) for custom_id, line in ids]

    def close(self) -> None:
        self._lines = {}
