"""Reading ``config.yaml`` plus flag/env overrides into a :class:`Config`.

Operators meet this module when they get something wrong, so its real product is
the error report: one line per problem, ``<file>: <key path>: <expected>, got
<value>``, every problem at once, and never a traceback or pydantic's own wording.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from pkg.deviceplugin import boundedyaml
from pkg.deviceplugin.config import flags
from pkg.deviceplugin.config.model import Config, EntryProblems, Loc, builtin_default, loc_text

DEFAULT_CONFIG_PATH = Path("/etc/kyb/device-plugin/config.yaml")
BUILTIN_SOURCE = "built-in default config"


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load(path: Path | None = None, overrides: Mapping[str, str] | None = None) -> Config:
    """The config at ``path`` (None: the default path) with ``overrides`` applied.

    Only a missing *default* file means "use the built-in default"; a path the
    operator named must exist, since running on the default instead would hide a typo.
    """
    source = path if path is not None else DEFAULT_CONFIG_PATH
    try:
        data = read_bounded(source)
        if len(data) > boundedyaml.MAX_BYTES:
            raise ConfigError(
                [f"{source}: file is larger than the {boundedyaml.MAX_BYTES} bytes allowed"]
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        # A dangling symlink is a broken ConfigMap mount, not an absent config.
        if path is None and not source.is_symlink():
            return validate(builtin_default().to_data(), BUILTIN_SOURCE, overrides)
        raise ConfigError([f"{source}: config file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{source}: is a directory, expected a config file"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            [f"{source}: not UTF-8 text (bad byte at offset {error.start})"]
        ) from None
    except OSError as error:
        raise ConfigError([f"{source}: cannot read config file: {error.strerror}"]) from None
    return load_text(text, str(source), overrides)


def read_bounded(path: Path) -> bytes:
    """The file's first ``MAX_BYTES + 1`` bytes: enough to tell it is too large, and
    never a whole multi-gigabyte file in memory."""
    with open(path, "rb") as f:
        return f.read(boundedyaml.MAX_BYTES + 1)


def load_text(text: str, source_name: str, overrides: Mapping[str, str] | None = None) -> Config:
    """Parse and validate config text; ``source_name`` prefixes every problem line."""
    return validate(_parse_yaml(text, source_name), source_name, overrides)


def validate(
    data: Mapping[str, Any], source_name: str, overrides: Mapping[str, str] | None = None
) -> Config:
    """Validate an already parsed mapping, each override replacing its top-level key."""
    merged = dict(data)
    problems: list[str] = []
    origins: dict[str, str] = {}
    for key, raw in (overrides or {}).items():
        origin = origin_of(overrides, key)
        try:
            merged[key] = parse_override(key, raw)
        except ValueError as error:
            problems.append(f"{origin}: {error}")
            continue
        origins[key] = origin
    try:
        # by_name=False: the file speaks camelCase only, so `seats_per_group` is a typo.
        config = Config.model_validate(merged, by_alias=True, by_name=False)
    except ValidationError as error:
        problems.extend(_problem_lines(error, source_name, origins))
    if problems:
        raise ConfigError(problems)
    return config


def origin_of(overrides: Mapping[str, str] | None, key: str) -> str:
    """The flag (or env var) that set config key ``key``."""
    if isinstance(overrides, flags.Overrides) and key in overrides.origins:
        return overrides.origins[key]
    return f"{flags.flag_name(key)}/{flags.env_name(key)}"


def parse_override(key: str, raw: str) -> Any:
    """Turn a flag/env string into the value its config key expects.

    Booleans, integers and lists are read as YAML values (``true``, ``3``,
    ``[G01, G23]``); a list key also takes ``G01,G23`` or a single item, and an empty
    string clears it. Strings, paths and durations are taken verbatim, since YAML
    would turn a directory called ``yes`` into a boolean and ``1:30`` into 90.
    """
    field_name = _field_name(Config, key)
    if field_name is None:
        raise ValueError(f"unknown config key {key!r}")
    annotation = Config.model_fields[field_name].annotation
    if get_origin(annotation) is tuple:
        return _list_override(raw)
    if annotation in (bool, int) or get_origin(annotation) is dict:
        return _yaml_value(raw)
    if not raw and type(None) in get_args(annotation):
        return None
    return raw


def _list_override(raw: str) -> Any:
    value = _yaml_value(raw)
    if value is None:
        return []
    if isinstance(value, str):
        return [_yaml_value(item.strip()) for item in value.split(",") if item.strip()]
    if isinstance(value, list | dict):
        return value
    return [value]


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "syntax error"
        raise ValueError(f"not a valid YAML value: {problem}, got {raw!r}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, which YAML otherwise resolves silently
    to the last one: a second ``profiles:`` would quietly drop the first."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> Any:
    first_lines: dict[str, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        if key_node.value in first_lines:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key_node.value!r} (first on line {first_lines[key_node.value]})",
                key_node.start_mark,
            )
        first_lines[key_node.value] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _parse_yaml(text: str, source_name: str) -> Mapping[str, Any]:
    # PyYAML reports a tab as "found character '\t' that cannot start any token",
    # often lines away from the tab, so tabs are found before the parser sees them.
    tab_lines = [
        f"{source_name}:{number}: tab character used for indentation; YAML needs spaces"
        for number, line in enumerate(text.splitlines(), start=1)
        if "\t" in line[: len(line) - len(line.lstrip(" \t"))]
    ]
    if tab_lines:
        raise ConfigError(tab_lines)
    try:
        # Bounded: size, depth and alias expansion are checked before composing.
        data = boundedyaml.load(text, source_name, _UniqueKeyLoader)
    except boundedyaml.YamlError as error:
        if "'\\t'" in error.problem:
            raise ConfigError([f"{error.where}: tab character where YAML needs a space"]) from None
        raise ConfigError([str(error)]) from None
    if data is None:
        raise ConfigError(
            [f"{source_name}: file is empty; expected a mapping with at least 'profiles'"]
        )
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source_name}: top level must be a mapping of config keys, got {_show(data)}"]
        )
    return data


def _problem_lines(
    error: ValidationError, source_name: str, origins: Mapping[str, str]
) -> list[str]:
    errors = error.errors()
    # Pydantic also calls a list "too short" when its only entries failed; the entry
    # errors already say what is wrong, the length complaint would mislead.
    inner_locs = {tuple(e["loc"][:depth]) for e in errors for depth in range(len(e["loc"]))}
    lines: list[str] = []
    for details in errors:
        if details["type"] == "too_short" and tuple(details["loc"]) in inner_locs:
            continue
        for loc, message in _explain(details):
            top = loc[0] if loc else None
            if isinstance(top, str) and top in origins:
                # The flag's name already says which key; repeat the path only below it.
                where = origins[top] if len(loc) == 1 else f"{origins[top]}: {loc_text(loc)}"
            else:
                where = f"{source_name}: {loc_text(loc)}" if loc else source_name
            lines.append(f"{where}: {message}")
    return lines


_EXPECTATIONS = {
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "path_type": "must be a path",
}


def _explain(details: ErrorDetails) -> list[tuple[Loc, str]]:
    """Pydantic's error as (key path, ``expected, got``) pairs in the operator's terms."""
    loc: Loc = tuple(details["loc"])
    kind = details["type"]
    ctx = details.get("ctx", {})
    got = f", got {_show(details['input'])}"
    if kind == "missing":
        return [(loc, "required key is missing")]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return [(loc, f"unknown key (expected one of: {', '.join(allowed)})")]
    if kind == "value_error":
        cause = ctx.get("error")
        if isinstance(cause, EntryProblems):
            return [(loc + sub_loc, text) for sub_loc, text in cause.problems]
        return [(loc, f"{cause}{got}")]
    if kind == "literal_error":
        return [(loc, f"must be {ctx['expected']}{got}")]
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        limit = next(value for name, value in ctx.items() if name in ("ge", "gt", "le", "lt"))
        return [(loc, f"must be {bounds[kind]} {limit}{got}")]
    if kind == "too_short":
        if ctx.get("min_length") == 1:
            return [(loc, f"must not be empty{got}")]
        return [(loc, f"must have at least {ctx.get('min_length')} entries{got}")]
    if kind in _EXPECTATIONS:
        return [(loc, f"{_EXPECTATIONS[kind]}{got}")]
    message = details["msg"]
    return [(loc, f"{message[:1].lower()}{message[1:]}{got}")]


def _field_name(model: type[BaseModel], key: str) -> str | None:
    return next(
        (name for name, field in model.model_fields.items() if (field.alias or name) == key),
        None,
    )


def _allowed_keys(loc: Loc) -> list[str]:
    """The keys valid at ``loc``, found by walking the model along the key path."""
    current: Any = Config
    for part in loc:
        if get_origin(current) in (Union, UnionType):  # an optional key: its value's type
            current = next(a for a in get_args(current) if a is not type(None))
        if isinstance(part, int) and get_origin(current) is tuple:
            current = get_args(current)[0]
        elif isinstance(part, str) and get_origin(current) is dict:  # a mapping's entry
            current = get_args(current)[1]
        elif isinstance(part, str) and isinstance(current, type) and issubclass(current, BaseModel):
            name = _field_name(current, part)
            current = current.model_fields[name].annotation if name else None
        else:
            current = None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [field.alias or name for name, field in current.model_fields.items()]
    return []


_SHOW_LIMIT = 60


def _show(value: object) -> str:
    """A value the way the operator wrote it in YAML, shortened if long."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict):
        text = f"a mapping {value!r}"
    elif isinstance(value, list):
        text = f"a list {value!r}"
    else:
        text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."
