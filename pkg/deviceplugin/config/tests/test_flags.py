"""Every config key as a flag and a KYB_* variable, and which one wins."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pkg.deviceplugin.config import flags
from pkg.deviceplugin.config.loader import ConfigError, load
from pkg.deviceplugin.config.model import Config

SEED_EXAMPLE = """\
profiles:
  - resource: kyb.ai/gpu-1x-seat
    seatsPerGroup: 4
  - resource: kyb.ai/gpu-2x-seat
    seatsPerGroup: 3
drain: [FILE]
stateDir: /from/file
"""


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(exit_on_error=False)
    flags.add_arguments(result)
    return result


@pytest.mark.parametrize(
    ("key", "flag", "env"),
    [
        ("allowOverprovision", "--allow-overprovision", "KYB_ALLOW_OVERPROVISION"),
        ("kubeletDir", "--kubelet-dir", "KYB_KUBELET_DIR"),
        ("podResourcesSocket", "--pod-resources-socket", "KYB_POD_RESOURCES_SOCKET"),
        ("stateDir", "--state-dir", "KYB_STATE_DIR"),
        ("drain", "--drain", "KYB_DRAIN"),
        ("ignoredXids", "--ignored-xids", "KYB_IGNORED_XIDS"),
    ],
)
def test_flag_and_env_names_follow_the_config_key(key: str, flag: str, env: str) -> None:
    assert (flags.flag_name(key), flags.env_name(key)) == (flag, env)


def test_every_config_key_but_version_has_a_flag() -> None:
    keys = {field.alias for field in Config.model_fields.values()}
    assert set(flags.OVERRIDABLE_KEYS) == keys - {"version"}
    options = {action.option_strings[0] for action in parser()._actions if action.option_strings}
    assert {flags.flag_name(key) for key in flags.OVERRIDABLE_KEYS} <= options


def test_unset_flags_are_none_so_the_file_value_stays() -> None:
    namespace = parser().parse_args([])
    assert all(getattr(namespace, name) is None for name in vars(namespace))
    assert flags.overrides_from(namespace, {}) == {}


def test_help_text_comes_from_the_model_and_names_the_env_var() -> None:
    text = parser().format_help()
    assert "--xid-recovery probes|never" in text
    assert "KYB_XID_RECOVERY" in " ".join(text.split())
    assert "only after a plugin restart" in " ".join(text.split())


def test_flag_beats_env_and_each_remembers_its_origin() -> None:
    namespace = parser().parse_args(["--drain", "G01"])
    overrides = flags.overrides_from(namespace, {"KYB_DRAIN": "G23", "KYB_STATE_DIR": "/env"})
    assert overrides == {"drain": "G01", "stateDir": "/env"}
    assert overrides.origins == {"drain": "--drain", "stateDir": "KYB_STATE_DIR"}


def test_unrelated_environment_is_ignored() -> None:
    namespace = parser().parse_args([])
    assert flags.overrides_from(namespace, {"KYB_CONFIG": "/x", "KYB_NVML_MOCK": "dgx"}) == {}


def test_overrides_from_flag_beat_env_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SEED_EXAMPLE, encoding="utf-8")
    environ = {"KYB_DRAIN": "ENV", "KYB_STATE_DIR": "/from/env", "KYB_LOG_FORMAT": "json"}
    namespace = parser().parse_args(["--drain", "FLAG"])
    config = load(path, flags.overrides_from(namespace, environ))
    assert config.drain == ("FLAG",)
    assert config.state_dir == Path("/from/env")
    assert config.log_format == "json"
    assert config.profiles[0].seats_per_group == 4


def test_a_bad_env_value_is_reported_under_the_variables_name(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SEED_EXAMPLE, encoding="utf-8")
    namespace = parser().parse_args(["--healthy-after-probes", "0"])
    overrides = flags.overrides_from(namespace, {"KYB_ALLOW_OVERPROVISION": "maybe"})
    with pytest.raises(ConfigError) as caught:
        load(path, overrides)
    assert caught.value.problems == [
        "KYB_ALLOW_OVERPROVISION: must be true or false, got 'maybe'",
        "--healthy-after-probes: must be >= 1, got 0",
    ]
