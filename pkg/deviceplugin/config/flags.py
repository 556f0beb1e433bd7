"""Every top-level config key as a ``--flag`` and a ``KYB_*`` environment variable.

The names are derived from the model's fields so that a new config key is settable
from the command line and the DaemonSet env without touching this module:
``allowOverprovision`` -> ``--allow-overprovision`` / ``KYB_ALLOW_OVERPROVISION``.
Values stay raw strings here; the loader parses and validates them together with
the file, so a bad flag is reported like a bad file entry.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Literal, get_args, get_origin

from pkg.deviceplugin.config.model import Config

ENV_PREFIX = "KYB_"

# `version` describes the file's schema, not the plugin's behaviour.
_FIELD_BY_KEY: dict[str, str] = {
    field.alias or name: name for name, field in Config.model_fields.items() if name != "version"
}
OVERRIDABLE_KEYS: tuple[str, ...] = tuple(_FIELD_BY_KEY)

_WORD_START = re.compile(r"(?<!^)(?=[A-Z])")


def flag_name(key: str) -> str:
    """``allowOverprovision`` -> ``--allow-overprovision``."""
    return "--" + _WORD_START.sub("-", key).lower()


def env_name(key: str) -> str:
    """``allowOverprovision`` -> ``KYB_ALLOW_OVERPROVISION``."""
    return ENV_PREFIX + _WORD_START.sub("_", key).upper()


def _dest(key: str) -> str:
    return _FIELD_BY_KEY[key]


class Overrides(dict[str, str]):
    """Raw override values by config key that remember which flag or variable set each.

    The loader uses the origin in error messages, so an operator is pointed at the
    ``--drain`` they typed or the ``KYB_DRAIN`` in their DaemonSet, not at the file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.origins: dict[str, str] = {}

    def put(self, key: str, value: str, origin: str) -> None:
        self[key] = value
        self.origins[key] = origin


def _metavar(key: str) -> str | None:
    annotation = Config.model_fields[_dest(key)].annotation
    if annotation is bool:
        return "true|false"
    if get_origin(annotation) is Literal:
        return "|".join(str(choice) for choice in get_args(annotation))
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One string option per config key; unset (None) means "keep the file's value"."""
    for key in OVERRIDABLE_KEYS:
        description = Config.model_fields[_dest(key)].description or ""
        parser.add_argument(
            flag_name(key),
            dest=_dest(key),
            metavar=_metavar(key),
            default=None,
            help=f"{' '.join(description.split())} [config key {key}; env {env_name(key)}]",
        )


def overrides_from(namespace: argparse.Namespace, environ: Mapping[str, str]) -> Overrides:
    """The overrides a command line and an environment ask for; a flag beats its variable."""
    overrides = Overrides()
    for key in OVERRIDABLE_KEYS:
        flag_value = getattr(namespace, _dest(key), None)
        if flag_value is not None:
            overrides.put(key, flag_value, flag_name(key))
        elif env_name(key) in environ:
            overrides.put(key, environ[env_name(key)], env_name(key))
    return overrides
