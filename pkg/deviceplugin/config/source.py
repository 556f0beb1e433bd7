"""Where the config comes from: a file plus flag and environment overrides, and what
a watcher needs to see it change."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pkg.deviceplugin.config import loader
from pkg.deviceplugin.config.model import Config


@dataclass
class ConfigSource:
    """Where the config comes from: a file (None: the default path) plus flag/env
    overrides, and the node it runs on (whose entry under ``nodes`` applies)."""

    path: Path | None = None
    overrides: Mapping[str, str] = field(default_factory=dict)
    node: str | None = None

    def load(self) -> Config:
        """The config in force on this node (see :meth:`Config.for_node`)."""
        return loader.load(self.path, self.overrides).for_node(self.node)

    def origin(self, key: str) -> str:
        """Where config key ``key`` (as the file spells it) came from: its flag or env
        var, else the file (or the built-in default when the default file is absent)."""
        if key in self.overrides:
            return loader.origin_of(self.overrides, key)
        path = self.path or loader.DEFAULT_CONFIG_PATH
        if self.path is None and not path.exists() and not path.is_symlink():
            return loader.BUILTIN_SOURCE
        return str(path)

    def dirs(self) -> list[Path]:
        """The directories whose changes may change the file: its own, and its target's
        through symlinks (resolved anew each time: a ConfigMap swaps them)."""
        path = self.path or loader.DEFAULT_CONFIG_PATH
        # A directory not there yet: its nearest ancestor that is sees it come.
        return [_existing(path.parent), _existing(path.resolve().parent)]

    def fingerprint(self) -> str | None:
        """A digest of the file's content now (through symlinks); None when unreadable."""
        try:
            data = loader.read_bounded(self.path or loader.DEFAULT_CONFIG_PATH)
        except OSError:
            return None
        return hashlib.sha256(data).hexdigest()


def _existing(directory: Path) -> Path:
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    return directory
