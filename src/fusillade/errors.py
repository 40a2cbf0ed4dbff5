"""The exception tree of fusillade.

```
FusilladeError
 +-- NotFound                 the object does not exist, is deleted, or belongs to another owner
 +-- StateConflict            the object exists but is not in a state that allows the operation
 +-- ValidationError          bad input; carries every bad line of a JSONL file (line number + reason)
 +-- ConfigurationError       the program is set up wrongly (missing extra, bad URL, old SQLite)
 +-- StorageError             any database failure; the driver's exception is the __cause__
      +-- StorageUnavailable  the database could not be reached or timed out; retrying may help
```

Each class's docstring is its default message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class FusilladeError(Exception):
    """Something went wrong in fusillade."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class NotFound(FusilladeError):
    """The object was not found."""


class StateConflict(FusilladeError):
    """The object is not in a state that allows this operation."""

    def __init__(self, message: str | None = None, *, current_state: str | None = None) -> None:
        super().__init__(message)
        self.current_state = current_state


@dataclass(frozen=True, slots=True)
class LineError:
    """One bad line of an uploaded JSONL file (line numbers start at 1; 0 means the whole file)."""

    line: int
    reason: str


class ValidationError(FusilladeError):
    """The input is invalid."""

    def __init__(self, message: str | None = None, *, errors: Sequence[LineError] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


class ConfigurationError(FusilladeError):
    """fusillade is not configured correctly."""


class StorageError(FusilladeError):
    """The database reported an error."""


class StorageUnavailable(StorageError):
    """The database could not be reached in time; the operation may be retried."""
