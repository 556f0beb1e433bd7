"""The plugin's configuration: models, the YAML loader and the flag/env overrides."""

from pkg.deviceplugin.config.flags import Overrides, add_arguments, overrides_from
from pkg.deviceplugin.config.loader import DEFAULT_CONFIG_PATH, ConfigError, load, load_text
from pkg.deviceplugin.config.model import Config, GroupSpec, Profile, builtin_default

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "ConfigError",
    "GroupSpec",
    "Overrides",
    "Profile",
    "add_arguments",
    "builtin_default",
    "load",
    "load_text",
    "overrides_from",
]
