"""The config model's own promises: defaults, durations, and entry-level validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pkg.deviceplugin.config.model import (
    Config,
    GroupSpec,
    Profile,
    builtin_default,
    format_duration,
    parse_duration,
)
from pkg.deviceplugin.types import GroupName


def test_builtin_default_is_the_seeds_two_profiles_with_auto_groups() -> None:
    config = builtin_default()
    assert [(p.resource, p.seats_per_group) for p in config.profiles] == [
        ("kyb.ai/gpu-1x-seat", 4),
        ("kyb.ai/gpu-2x-seat", 3),
    ]
    assert config.groups == ()


def test_defaults_match_the_spec() -> None:
    config = builtin_default()
    assert config.allow_overprovision is False
    assert config.preferred_allocation_policy == "spread"
    assert config.device_list_strategy == "envvar"
    assert config.drain == ()
    assert (config.refresh_interval, config.reconcile_interval) == (30.0, 10.0)
    assert (config.release_grace_period, config.health_probe_interval) == (60.0, 1.0)
    assert config.healthy_after_probes == 3
    assert config.ignored_xids == (13, 31, 43, 45, 68, 109)
    assert config.extra_ignored_xids == ()
    assert config.xid_recovery == "probes"
    assert config.kubelet_dir == Path("/var/lib/kubelet/device-plugins")
    assert config.pod_resources_socket == Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    assert config.state_dir == Path("/var/lib/kyb/device-plugin")
    assert (config.log_format, config.metrics_address) == ("text", None)


def test_config_is_frozen_so_hot_reload_swaps_whole_objects() -> None:
    config = builtin_default()
    with pytest.raises(ValidationError):
        config.allow_overprovision = True


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("45", 45.0),
        (" 2m ", 120.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_durations_accept_numbers_and_unit_strings(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10x", "1:30", "m", "s10", "1.5.5s", "-1s", 0, -3, True, None])
def test_durations_reject_garbage_and_non_positive_values(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(bad)


@given(st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_formatted_durations_read_back_exactly(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_whole_durations_format_the_way_operators_write_them() -> None:
    assert [format_duration(s) for s in (30.0, 60.0, 90.0, 0.5)] == ["30s", "1m", "1m30s", "0.5s"]


def test_profile_group_size_comes_from_the_resource_name() -> None:
    profile = Profile.model_validate({"resource": "kyb.ai/gpu-4x-seat", "seatsPerGroup": 2})
    assert profile.group_size == 4


def test_group_name_may_be_59_characters_but_not_60() -> None:
    GroupSpec(name=GroupName("G" * 59), gpus=(0,))
    with pytest.raises(ValidationError):
        GroupSpec(name=GroupName("G" * 60), gpus=(0,))


def test_one_gpu_may_sit_in_groups_of_different_sizes() -> None:
    config = Config.model_validate(
        {
            "profiles": [{"resource": "kyb.ai/gpu-1x-seat", "seatsPerGroup": 1}],
            "groups": [{"name": "A", "gpus": [0]}, {"name": "B", "gpus": [0, 1]}],
        }
    )
    assert [g.name for g in config.groups_of_size(2)] == ["B"]


def test_lookup_helpers() -> None:
    config = builtin_default()
    assert config.resources == ("kyb.ai/gpu-1x-seat", "kyb.ai/gpu-2x-seat")
    profile = config.profile("kyb.ai/gpu-2x-seat")
    assert profile is not None and profile.seats_per_group == 3
    assert config.profile("kyb.ai/gpu-4x-seat") is None


def test_extra_ignored_xids_add_to_the_defaults_and_ignored_xids_replaces_them() -> None:
    seed = builtin_default().to_data()
    added = Config.model_validate({**seed, "extraIgnoredXids": [94]})
    assert added.all_ignored_xids == {13, 31, 43, 45, 68, 109, 94}
    assert added.dropped_default_xids == ()
    replaced = Config.model_validate({**seed, "ignoredXids": [94, 13]})
    assert replaced.all_ignored_xids == {94, 13}
    assert replaced.dropped_default_xids == (31, 43, 45, 68, 109)
    both = Config.model_validate({**seed, "ignoredXids": [13], "extraIgnoredXids": [31, 43]})
    assert both.dropped_default_xids == (45, 68, 109)
