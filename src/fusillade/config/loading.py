"""Reading the configuration: a TOML file, with `FUSILLADE_*` environment variables over it.

The file is the one passed in (`fusillade --config PATH`), else the one `FUSILLADE_CONFIG` names, else none
(defaults and environment only). Variables use `__` between nested keys (`FUSILLADE_SERVER__PORT=8081`,
`FUSILLADE_DAEMON__RETRY__MAX_ATTEMPTS=5`), or hold a whole table as JSON (`FUSILLADE_MODELS='{...}'`); they
win over the file, a table's keys merging with the file's. pydantic-settings reads the variables; this module
reads them from a given mapping, so that tests and embedding services control the environment, and turns
every validation error into a `Problem` naming the file or the variable the bad value came from.
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import pydantic
from pydantic_core import ErrorDetails
from pydantic_settings import EnvSettingsSource

from fusillade.config.problems import InvalidConfiguration, Problem, dotted_key
from fusillade.config.schema import ENV_NESTED_DELIMITER, ENV_PREFIX, Config

CONFIG_VARIABLE = "FUSILLADE_CONFIG"
"""Names the configuration file when none is passed."""

logger = logging.getLogger(__name__)

_MESSAGES = {
    "missing": "is required: add it",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string (in quotes)",
    "string_too_short": "must not be empty",
    "path_type": "must be a path (a string)",
    "model_type": "must be a table ([section] in the file, a JSON object in an environment variable)",
    "model_attributes_type": "must be a table ([section] in the file, a JSON object in an environment variable)",
    "dict_type": "must be a table ([section] in the file, a JSON object in an environment variable)",
    "tuple_type": 'must be a list of strings, such as ["a", "b"] (a JSON array in an environment variable)',
    "list_type": 'must be a list of strings, such as ["a", "b"] (a JSON array in an environment variable)',
}


def load_config(path: Path | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration from the file at `path` (else the one `FUSILLADE_CONFIG` names, else none) and the
    `FUSILLADE_*` variables of `environ` (default: the process environment), which win over the file.

    Raises `InvalidConfiguration` (a `ConfigurationError`) listing every problem, one a line, as
    `<file or variable>: <dotted key>: <what is wrong and how to fix it>`. A named file that does not exist
    is a problem; no file at all is not. Reads no secret: keys are read by `Config.resolve_routes` and
    `Config.admin_key`.
    """
    environ = os.environ if environ is None else environ
    named_by = "passed in"
    if path is None and environ.get(CONFIG_VARIABLE):
        path, named_by = Path(environ[CONFIG_VARIABLE]), f"named by {CONFIG_VARIABLE}"
    file_values = _read_file(path, named_by) if path is not None else {}
    variables = {
        name: value
        for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX) and name.upper() != CONFIG_VARIABLE
    }
    _warn_about_near_misses(variables)
    environment_values = _read_environment(variables)
    try:
        config = Config.model_validate(_merge(file_values, environment_values))
    except pydantic.ValidationError as exc:
        sources = _Sources(path, file_values, environment_values, variables)
        raise InvalidConfiguration([_problem(error, sources) for error in exc.errors()]) from None
    config._source = path
    return config


# ------------------------------------------------------------------------------------------------ reading


def _read_file(path: Path, named_by: str) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        message = f"no such configuration file ({named_by}); check the path, or leave it out to use the defaults"
    except OSError as exc:
        message = f"cannot be read: {exc.strerror}"
    except UnicodeDecodeError:
        message = "is not UTF-8 text"
    except tomllib.TOMLDecodeError as exc:
        message = f"is not valid TOML: {exc}"
    raise InvalidConfiguration([Problem(str(path), "", message)])


class _EnvironmentSource(EnvSettingsSource):
    """pydantic-settings' reading of the `FUSILLADE_*` variables, from a given mapping instead of `os.environ`."""

    def __init__(self, variables: Mapping[str, str]) -> None:
        self._variables = variables
        super().__init__(Config)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._variables.items()}


def _read_environment(variables: Mapping[str, str]) -> dict[str, Any]:
    # pydantic-settings raises its SettingsError, a ValueError (exported from different modules over versions).
    try:
        return _EnvironmentSource(variables)()
    except ValueError:
        pass
    # Only a table or a list given as bad JSON fails here; find which variables hold one, to name them.
    problems = []
    for name, value in sorted(variables.items()):
        try:
            _EnvironmentSource({name: value})()
        except ValueError as exc:
            problems.append(
                Problem(
                    name,
                    dotted_key(_variable_path(name)),
                    f"is not valid JSON ({exc.__cause__}); write a table as a JSON object "
                    """('{"key": "value"}') and a list as a JSON array ('["a", "b"]')""",
                )
            )
    raise InvalidConfiguration(
        problems or [Problem("environment", "", "the FUSILLADE_* variables cannot be read")]
    )


def _variable_path(name: str) -> tuple[str, ...]:
    return tuple(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER))


def _warn_about_near_misses(variables: Mapping[str, str]) -> None:
    """Variables that match no setting are ignored (other tools share the prefix); warn when one looks like
    a misspelt setting, such as `FUSILLADE_DATABSE_URL` or `FUSILLADE_SERVER_PORT` (one underscore)."""
    fields = list(Config.model_fields)
    for name in sorted(variables):
        head = _variable_path(name)[0]
        if head in fields:
            continue
        section = next((field for field in fields if head.startswith(f"{field}_")), None)
        if section is not None:
            suggestion = f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}{head[len(section) + 1 :].upper()}"
        else:
            close = difflib.get_close_matches(head, fields, n=1, cutoff=0.8)
            if not close:
                continue
            suggestion = f"{ENV_PREFIX}{close[0].upper()}"
        logger.warning("%s is not a configuration setting and is ignored; did you mean %s?", name, suggestion)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ----------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True, slots=True)
class _Sources:
    path: Path | None
    file_values: dict[str, Any]
    environment_values: dict[str, Any]
    variables: Mapping[str, str]


def _problem(error: ErrorDetails, sources: _Sources) -> Problem:
    location = tuple(error["loc"])
    naming = bool(location) and location[-1] == "[key]"
    if naming:
        location = location[:-1]  # the name of a table (a model name) is bad, not its contents
    message = _describe(error, location)
    return Problem(
        _source_of(location, sources), dotted_key(location), f"the name {message}" if naming else message
    )


def _describe(error: ErrorDetails, location: tuple[str | int, ...]) -> str:
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return _unknown_key(location)
    if kind == "value_error":
        return str(context["error"])
    if kind == "greater_than_equal":
        return f"must be at least {context['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {context['le']}"
    return _MESSAGES.get(kind, error["msg"])


def _unknown_key(location: tuple[str | int, ...]) -> str:
    allowed = _keys_at(location[:-1])
    close = difflib.get_close_matches(str(location[-1]), allowed, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key; {hint}the keys allowed here are: {', '.join(allowed)}"


def _keys_at(location: tuple[str | int, ...]) -> list[str]:
    """The keys the table at `location` may hold."""
    section: type[pydantic.BaseModel] | None = Config
    skip_name = False
    for segment in location:
        if skip_name:  # the name under a dict of tables (`models."gpt-4o"`)
            skip_name = False
            continue
        field = section.model_fields.get(str(segment)) if section is not None else None
        if field is None:
            return []
        section, skip_name = _table_type(field.annotation)
    return list(section.model_fields) if section is not None else []


def _table_type(annotation: Any) -> tuple[type[pydantic.BaseModel] | None, bool]:
    """The section class an annotation holds, and whether it is a dict of them keyed by name."""
    is_dict = get_origin(annotation) is dict
    candidates = get_args(annotation)[1:] if is_dict else (annotation, *get_args(annotation))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
            return candidate, is_dict
    return None, is_dict


def _source_of(location: tuple[str | int, ...], sources: _Sources) -> str:
    """The file, or the variable(s), that the value at `location` came from: a value set by a variable came
    from it; otherwise whichever source holds the deepest part of the location (both, for a table they both
    filled, where a rule across its keys failed)."""
    file = str(sources.path) if sources.path is not None else None
    file_depth, _ = _walk(sources.file_values, location) if file else (0, None)
    environment_depth, value = _walk(sources.environment_values, location)
    variables = _variables_for(location, sources.variables)
    if variables and environment_depth == len(location) and not isinstance(value, dict):
        return variables
    deepest = max(file_depth, environment_depth)
    found = []
    if file and file_depth == deepest:
        found.append(file)
    if variables and environment_depth == deepest:
        found.append(variables)
    return ", ".join(found) if deepest else file or "defaults"


def _walk(values: Any, location: tuple[str | int, ...]) -> tuple[int, Any]:
    """How many segments of `location` lead into `values`, and the value reached."""
    depth = 0
    for segment in location:
        present = (isinstance(values, dict) and segment in values) or (
            isinstance(values, list) and isinstance(segment, int) and segment < len(values)
        )
        if not present:
            break
        values = values[segment]
        depth += 1
    return depth, values


def _variables_for(location: tuple[str | int, ...], variables: Mapping[str, str]) -> str:
    """The variables whose path shares the longest start with `location` (names compared in any case)."""
    wanted = [str(segment).lower() for segment in location]
    best, names = 0, list[str]()
    for name in sorted(variables):
        shared = 0
        for have, want in zip(_variable_path(name), wanted, strict=False):
            if have != want:
                break
            shared += 1
        if shared and shared >= best:
            names = [*names, name] if shared == best else [name]
            best = shared
    return ", ".join(names)
