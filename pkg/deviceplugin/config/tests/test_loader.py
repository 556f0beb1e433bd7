"""What an operator sees when loading config.yaml: a Config, or one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkg.deviceplugin.config import loader
from pkg.deviceplugin.config.flags import Overrides
from pkg.deviceplugin.config.loader import ConfigError, load, load_text
from pkg.deviceplugin.config.model import Config, builtin_default

# Verbatim from MISSION.md: the seed's example must load unchanged.
SEED_EXAMPLE = """\
profiles:
  - resource: kyb.ai/gpu-1x-seat
    seatsPerGroup: 4
  - resource: kyb.ai/gpu-2x-seat
    seatsPerGroup: 3
groups:
  - name: G01
    gpus: [0,1]
  - name: G23
    gpus: [2,3]
"""

SOURCE = "/etc/x.yaml"


def problems_of(text: str, overrides: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(text, SOURCE, overrides)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_seed_example_loads_unchanged() -> None:
    config = load_text(SEED_EXAMPLE, SOURCE)
    assert [(p.resource, p.seats_per_group) for p in config.profiles] == [
        ("kyb.ai/gpu-1x-seat", 4),
        ("kyb.ai/gpu-2x-seat", 3),
    ]
    assert [(g.name, g.gpus) for g in config.groups] == [("G01", (0, 1)), ("G23", (2, 3))]


def test_durations_load_from_unit_strings() -> None:
    config = load_text(SEED_EXAMPLE + "refreshInterval: 1m30s\nreconcileInterval: 500ms\n", SOURCE)
    assert (config.refresh_interval, config.reconcile_interval) == (90.0, 0.5)


def test_to_yaml_round_trips_through_the_loader() -> None:
    config = load_text(
        SEED_EXAMPLE
        + "allowOverprovision: true\ndrain: [G01]\nrefreshInterval: 1.5s\n"
        + "metricsAddress: '[::]:9400'\nstateDir: /tmp/kyb\nxidRecovery: never\n",
        SOURCE,
    )
    assert load_text(config.to_yaml(), "round-trip") == config
    assert load_text(builtin_default().to_yaml(), "round-trip") == builtin_default()


BAD_CONFIG = """\
profiles:
  - resource: nvidia.com/gpu
    seatsPerGroup: 4
  - resource: kyb.ai/gpu-2x-seat
    seatsPerGroup: 0
  - resource: kyb.ai/gpu-1x-seat
    seatsPerGrop: 2
allowOverprovision: maybe
preferredAllocationPolicy: fast
refreshInterval: 10x
"""


def test_every_problem_is_reported_one_line_each() -> None:
    assert problems_of(BAD_CONFIG) == [
        "/etc/x.yaml: profiles[0].resource: must be kyb.ai/gpu-<1|2|4>x-seat, got 'nvidia.com/gpu'",
        "/etc/x.yaml: profiles[1].seatsPerGroup: must be >= 1, got 0",
        "/etc/x.yaml: profiles[2].seatsPerGroup: required key is missing",
        "/etc/x.yaml: profiles[2].seatsPerGrop: unknown key "
        "(expected one of: resource, seatsPerGroup)",
        "/etc/x.yaml: allowOverprovision: must be true or false, got 'maybe'",
        "/etc/x.yaml: preferredAllocationPolicy: must be 'spread' or 'pack', got 'fast'",
        "/etc/x.yaml: refreshInterval: must be a duration such as 30s, 500ms or 1m30s, got '10x'",
    ]


def test_config_error_str_is_the_problems_joined_by_newlines() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(BAD_CONFIG, SOURCE)
    assert str(caught.value) == "\n".join(caught.value.problems)


BROKEN_CONFIGS = [
    BAD_CONFIG,
    "profiles: {}\n",
    "profiles: 3\n",
    "profiles: []\n",
    "profiles:\n  - 7\n",
    "groups: []\n",
    "profiles: [{resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 1}]\n"
    + "groups:\n  - name: G01\n    gpus: [0, 1, 2]\n  - {name: G02, gpus: [1, 1]}\n",
    SEED_EXAMPLE.replace("G23", "G01"),
    SEED_EXAMPLE + "healthyAfterProbes: 0\nignoredXids: [x]\nlogFormat: xml\n",
    SEED_EXAMPLE + "kubeletDir: ''\nmetricsAddress: nowhere\nstateDir: [a]\n",
    SEED_EXAMPLE + "drain: G01\nversion: v2\nxidRecovery: sometimes\n",
    SEED_EXAMPLE + "reconcileInterval: 0\nreleaseGracePeriod: -5s\n",
    "version: v1\nprofile: []\n",
]


@pytest.mark.parametrize("text", BROKEN_CONFIGS)
def test_every_error_message_names_file_and_key_path_without_traceback_text(text: str) -> None:
    problems = problems_of(text)
    assert problems
    for line in problems:
        assert "\n" not in line
        assert line.startswith(f"{SOURCE}: ")
        key_path = line.split(": ")[1]
        assert key_path and " " not in key_path, line
        for leak in ("Traceback", "pydantic", "Input should", "For further information", "type="):
            assert leak not in line


def test_unknown_top_level_key_lists_every_valid_key() -> None:
    [line] = problems_of(SEED_EXAMPLE + "allowOverprovisioning: true\n")
    assert line.startswith("/etc/x.yaml: allowOverprovisioning: unknown key (expected one of: ")
    assert "allowOverprovision," in line and "metricsAddress)" in line


def test_snake_case_keys_are_unknown_keys() -> None:
    problems = problems_of("profiles:\n  - resource: kyb.ai/gpu-1x-seat\n    seats_per_group: 2\n")
    assert "/etc/x.yaml: profiles[0].seats_per_group: unknown key " in problems[-1]


def test_a_list_whose_entries_fail_is_not_also_called_empty() -> None:
    problems = problems_of("profiles:\n  - resource: kyb.ai/gpu-1x-seat\n")
    assert problems == ["/etc/x.yaml: profiles[0].seatsPerGroup: required key is missing"]


def test_empty_profiles_list_is_an_error() -> None:
    assert problems_of("profiles: []\n") == [
        "/etc/x.yaml: profiles: must not be empty, got a list []"
    ]


def test_missing_profiles_is_an_error() -> None:
    assert problems_of("groups: []\n") == ["/etc/x.yaml: profiles: required key is missing"]


def test_duplicate_profile_resource_names_both_entries() -> None:
    problems = problems_of(SEED_EXAMPLE.replace("gpu-2x-seat", "gpu-1x-seat"))
    assert problems == [
        "/etc/x.yaml: profiles[1].resource: duplicate resource 'kyb.ai/gpu-1x-seat' "
        "(also profiles[0])"
    ]


def test_seats_per_group_has_an_upper_bound_that_keeps_device_ids_short() -> None:
    problems = problems_of("profiles:\n  - {resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 65}\n")
    assert problems == ["/etc/x.yaml: profiles[0].seatsPerGroup: must be <= 64, got 65"]


# --- groups ------------------------------------------------------------------------

PROFILES = "profiles:\n  - {resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 2}\n"


def groups_problems(groups: str) -> list[str]:
    return problems_of(PROFILES + "groups:\n" + groups)


def test_duplicate_group_name_names_both_entries() -> None:
    problems = groups_problems(
        "  - {name: G01, gpus: [0, 1]}\n"
        "  - {name: G23, gpus: [2, 3]}\n"
        "  - {name: G01, gpus: [4, 5]}\n"
    )
    assert problems == ["/etc/x.yaml: groups[2].name: duplicate group name 'G01' (also groups[0])"]


def test_gpu_twice_among_groups_of_one_size_names_the_other_group() -> None:
    problems = groups_problems("  - {name: G01, gpus: [0, 1]}\n  - {name: G12, gpus: [1, 2]}\n")
    assert problems == [
        "/etc/x.yaml: groups[1].gpus: GPU 1 is already in 2-GPU group 'G01' (groups[0])"
    ]


def test_gpu_twice_in_one_group_is_an_error() -> None:
    assert groups_problems("  - {name: G00, gpus: [0, 0]}\n") == [
        "/etc/x.yaml: groups[0].gpus: must not list a GPU twice, got a list [0, 0]"
    ]


@pytest.mark.parametrize("gpus", ["[]", "[0, 1, 2]", "[0, 1, 2, 3, 4, 5, 6, 7]"])
def test_group_size_must_be_1_2_or_4(gpus: str) -> None:
    [line] = groups_problems(f"  - {{name: G, gpus: {gpus}}}\n")
    assert line.startswith("/etc/x.yaml: groups[0].gpus: must list 1, 2 or 4 GPUs, got ")


def test_negative_gpu_index_names_the_position() -> None:
    assert groups_problems("  - {name: G, gpus: [0, -1]}\n") == [
        "/etc/x.yaml: groups[0].gpus[1]: must be >= 0, got -1"
    ]


@pytest.mark.parametrize("name", ["-G01", "G 01", "G/01", "G" * 60, "''"])
def test_group_names_must_fit_into_device_ids(name: str) -> None:
    [line] = groups_problems(f"  - {{name: {name}, gpus: [0]}}\n")
    assert line.startswith("/etc/x.yaml: groups[0].name: must be 1-59 characters")


def test_unknown_gpu_indices_are_left_for_the_topology_check() -> None:
    config = load_text(PROFILES + "groups:\n  - {name: far, gpus: [98, 99]}\n", SOURCE)
    assert config.groups[0].gpus == (98, 99)


# --- YAML-level problems -----------------------------------------------------------


def test_tab_indentation_gets_its_own_message_with_line() -> None:
    text = "profiles:\n  - resource: kyb.ai/gpu-1x-seat\n\tseatsPerGroup: 4\n"
    assert problems_of(text) == [
        "/etc/x.yaml:3: tab character used for indentation; YAML needs spaces"
    ]


def test_every_tab_indented_line_is_reported() -> None:
    text = "profiles:\n\t- resource: kyb.ai/gpu-1x-seat\n \t  seatsPerGroup: 4\n"
    assert [line.split(": ")[0] for line in problems_of(text)] == ["/etc/x.yaml:2", "/etc/x.yaml:3"]


def test_tab_indented_comments_and_blank_lines_count_too() -> None:
    # PyYAML refuses these as well, with a message pointing nowhere useful.
    text = SEED_EXAMPLE + "\t# a comment\n  \t\n"
    assert [line.split(": ")[0] for line in problems_of(text)] == [
        "/etc/x.yaml:11",
        "/etc/x.yaml:12",
    ]


def test_a_tab_after_a_value_is_named_with_line_and_column() -> None:
    assert problems_of(SEED_EXAMPLE + "drain: [G01]\t# why\n") == [
        "/etc/x.yaml:11:13: tab character where YAML needs a space"
    ]


def test_tabs_inside_quoted_values_are_fine() -> None:
    assert load_text(SEED_EXAMPLE + 'stateDir: "/tmp/a\tb"\n', SOURCE).state_dir.name == "a\tb"


def test_yaml_syntax_error_is_one_line_with_line_and_column() -> None:
    [line] = problems_of("profiles:\n  - resource: kyb.ai/gpu-1x-seat\n   seatsPerGroup: 4\n")
    assert line.startswith("/etc/x.yaml:3:")
    assert "invalid YAML: " in line


def test_duplicate_keys_are_an_error_instead_of_last_one_wins() -> None:
    assert problems_of(SEED_EXAMPLE + "groups: []\n") == [
        "/etc/x.yaml:11:1: invalid YAML: duplicate key 'groups' (first on line 6)"
    ]


@pytest.mark.parametrize("text", ["", "   \n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_error(text: str) -> None:
    assert problems_of(text) == [
        "/etc/x.yaml: file is empty; expected a mapping with at least 'profiles'"
    ]


@pytest.mark.parametrize(("text", "shown"), [("- a\n", "a list ['a']"), ("hello\n", "'hello'")])
def test_top_level_must_be_a_mapping(text: str, shown: str) -> None:
    assert problems_of(text) == [
        f"/etc/x.yaml: top level must be a mapping of config keys, got {shown}"
    ]


# --- files -------------------------------------------------------------------------


def test_missing_default_file_means_the_builtin_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    assert load(None) == builtin_default()


def test_missing_default_file_still_takes_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    config = load(None, {"allowOverprovision": "true"})
    assert config.allow_overprovision is True
    assert config.profiles == builtin_default().profiles


def test_existing_default_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", write(tmp_path, SEED_EXAMPLE))
    assert len(load(None).groups) == 2


def test_empty_default_file_is_an_error_not_the_builtin_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", path)
    with pytest.raises(ConfigError, match="file is empty"):
        load(None)


def test_dangling_default_symlink_is_an_error_not_the_builtin_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tmp_path / "config.yaml"
    link.symlink_to(tmp_path / "..data" / "config.yaml")
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", link)
    with pytest.raises(ConfigError) as caught:
        load(None)
    assert caught.value.problems == [f"{link}: config file not found"]


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [f"{path}: config file not found"]


def test_problems_name_the_file_that_was_loaded(tmp_path: Path) -> None:
    path = write(tmp_path, "profiles: []\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems[0].startswith(f"{path}: profiles: ")


def test_a_directory_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert caught.value.problems == [f"{tmp_path}: is a directory, expected a config file"]


def test_an_unreadable_file_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod cannot lock out root, which CI containers often are; fail the read instead.
    def refuse(path: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    path = write(tmp_path, SEED_EXAMPLE)
    monkeypatch.setattr(loader, "read_bounded", refuse)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [f"{path}: cannot read config file: Permission denied"]


def test_a_binary_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"profiles: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [f"{path}: not UTF-8 text (bad byte at offset 10)"]


# --- overrides ---------------------------------------------------------------------


def test_override_replaces_the_file_key() -> None:
    config = load_text(
        SEED_EXAMPLE, SOURCE, {"profiles": "[{resource: kyb.ai/gpu-4x-seat, seatsPerGroup: 2}]"}
    )
    assert [(p.resource, p.seats_per_group) for p in config.profiles] == [("kyb.ai/gpu-4x-seat", 2)]
    assert len(config.groups) == 2


@pytest.mark.parametrize(
    ("raw", "drain"),
    [
        ("[G01, G23]", ("G01", "G23")),
        ("G01,G23", ("G01", "G23")),
        ("G01, G23,", ("G01", "G23")),
        ("G01", ("G01",)),
        ("", ()),
    ],
)
def test_list_overrides_take_yaml_comma_separated_or_single_values(
    raw: str, drain: tuple[str, ...]
) -> None:
    assert load_text(SEED_EXAMPLE + "drain: [X]\n", SOURCE, {"drain": raw}).drain == drain


def test_integer_list_overrides_become_integers() -> None:
    assert load_text(SEED_EXAMPLE, SOURCE, {"ignoredXids": "13, 31"}).ignored_xids == (13, 31)
    assert load_text(SEED_EXAMPLE, SOURCE, {"ignoredXids": "48"}).ignored_xids == (48,)


def test_scalar_overrides_are_parsed_as_yaml_values() -> None:
    config = load_text(
        SEED_EXAMPLE, SOURCE, {"allowOverprovision": "true", "healthyAfterProbes": "5"}
    )
    assert (config.allow_overprovision, config.healthy_after_probes) == (True, 5)


def test_path_and_duration_overrides_are_taken_verbatim() -> None:
    config = load_text(
        SEED_EXAMPLE, SOURCE, {"stateDir": "yes", "kubeletDir": "0755", "refreshInterval": "90"}
    )
    assert (config.state_dir, config.kubelet_dir) == (Path("yes"), Path("0755"))
    assert config.refresh_interval == 90.0


def test_empty_metrics_address_override_turns_metrics_off() -> None:
    config = load_text(SEED_EXAMPLE + "metricsAddress: ':9400'\n", SOURCE, {"metricsAddress": ""})
    assert config.metrics_address is None


def test_override_errors_name_the_flag_or_env_var_not_the_file() -> None:
    overrides = Overrides()
    overrides.put("allowOverprovision", "maybe", "KYB_ALLOW_OVERPROVISION")
    overrides.put("profiles", "[{resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 0}]", "--profiles")
    overrides.put("refreshInterval", "1:30", "--refresh-interval")
    overrides.put("drain", "[G01", "KYB_DRAIN")
    assert problems_of(SEED_EXAMPLE, overrides) == [
        "KYB_DRAIN: not a valid YAML value: expected ',' or ']', but got '<stream end>', "
        "got '[G01'",
        "--profiles: profiles[0].seatsPerGroup: must be >= 1, got 0",
        "KYB_ALLOW_OVERPROVISION: must be true or false, got 'maybe'",
        "--refresh-interval: must be a duration such as 30s, 500ms or 1m30s, got '1:30'",
    ]


def test_override_errors_without_a_known_origin_name_both_flag_and_env() -> None:
    assert problems_of(SEED_EXAMPLE, {"logFormat": "xml"}) == [
        "--log-format/KYB_LOG_FORMAT: must be 'text' or 'json', got 'xml'"
    ]


def test_unknown_override_key_is_an_error() -> None:
    assert problems_of(SEED_EXAMPLE, {"colour": "blue"}) == [
        "--colour/KYB_COLOUR: unknown config key 'colour'"
    ]


def test_file_and_override_problems_are_reported_together() -> None:
    problems = problems_of("profiles: []\n", {"allowOverprovision": "maybe"})
    assert problems == [
        "/etc/x.yaml: profiles: must not be empty, got a list []",
        "--allow-overprovision/KYB_ALLOW_OVERPROVISION: must be true or false, got 'maybe'",
    ]


def test_loaded_config_is_a_config() -> None:
    assert isinstance(load_text(SEED_EXAMPLE, SOURCE), Config)
