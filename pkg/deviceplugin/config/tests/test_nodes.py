"""Per-node overrides, drainGpus and a group's own seat count in the config (issue 15
points 1-3): validated as strictly as the rest, one line per problem naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkg.deviceplugin.config import flags, loader
from pkg.deviceplugin.config.model import Config, GroupSpec, NodeOverride, builtin_default
from pkg.deviceplugin.config.source import ConfigSource
from pkg.deviceplugin.types import GroupName

R1, R2 = "kyb.ai/gpu-1x-seat", "kyb.ai/gpu-2x-seat"
PROFILES = (
    f"profiles:\n  - {{resource: {R1}, seatsPerGroup: 4}}\n"
    f"  - {{resource: {R2}, seatsPerGroup: 3}}\n"
)


def problems(text: str, overrides: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(loader.ConfigError) as caught:
        loader.load_text(PROFILES + text, "/etc/x.yaml", overrides)
    return caught.value.problems


def test_a_node_override_replaces_the_pool_values_it_sets_on_that_node_only() -> None:
    config = loader.load_text(
        PROFILES
        + "drain: [G01]\ndrainGpus: [GPU-a]\ngroups:\n  - {name: G01, gpus: [0, 1]}\n"
        + "nodes:\n"
        + "  gpu-a:\n"
        + "    drain: [G23]\n"
        + f"    seatsPerGroup: {{{R2}: 6}}\n"
        + "    groups:\n      - {name: P01, gpus: [0, 1], seatsPerGroup: 8}\n"
        + "  ip-10-0-0-1.ec2.internal: {drainGpus: [3]}\n",
        "/etc/x.yaml",
    )
    on_a = config.for_node("gpu-a")
    assert on_a.drain == ("G23",) and on_a.drain_gpus == ("GPU-a",)  # drainGpus not set
    assert [(p.resource, p.seats_per_group) for p in on_a.profiles] == [(R1, 4), (R2, 6)]
    assert on_a.groups == (GroupSpec(name=GroupName("P01"), gpus=(0, 1), seats_per_group=8),)
    on_b = config.for_node("ip-10-0-0-1.ec2.internal")
    assert (on_b.drain, on_b.drain_gpus, on_b.groups) == (("G01",), (3,), config.groups)
    # A node the config does not name, or none known, runs the pool-wide config.
    assert config.for_node("gpu-c") is config and config.for_node(None) is config


@given(
    nodes=st.dictionaries(
        st.text("abcdefgh-.", min_size=1, max_size=6),
        st.builds(
            NodeOverride,
            drain=st.none() | st.lists(st.sampled_from(["G0", "G1", "G01"])).map(tuple),
            drain_gpus=st.none() | st.lists(st.integers(0, 7) | st.just("GPU-x")).map(tuple),
            seats_per_group=st.none() | st.dictionaries(st.just(R2), st.integers(1, 64)),
        ),
        max_size=4,
    ),
    node=st.text("abcdefgh-.", min_size=1, max_size=6),
)
def test_an_override_applies_exactly_on_its_node(nodes: dict[str, NodeOverride], node: str) -> None:
    base = builtin_default().model_copy(update={"drain": ("G9",), "nodes": nodes})
    effective = base.for_node(node)
    override = nodes.get(node)
    if override is None:
        assert effective == base
        return
    assert effective.drain == (base.drain if override.drain is None else override.drain)
    want_gpus = base.drain_gpus if override.drain_gpus is None else override.drain_gpus
    assert effective.drain_gpus == want_gpus
    counts = override.seats_per_group or {}
    for before, after in zip(base.profiles, effective.profiles, strict=True):
        assert after.seats_per_group == counts.get(before.resource, before.seats_per_group)
    # Everything else is the pool's.
    assert (
        effective.model_copy(
            update={"drain": base.drain, "drain_gpus": base.drain_gpus, "profiles": base.profiles}
        )
        == base
    )


def test_an_unknown_key_in_an_override_is_one_line_naming_its_path() -> None:
    assert problems("nodes:\n  gpu-a:\n    drian: [G01]\n") == [
        "/etc/x.yaml: nodes.gpu-a.drian: unknown key "
        "(expected one of: drain, drainGpus, seatsPerGroup, groups)"
    ]
    # A node name with dots is bracketed so the path still reads as one key.
    assert problems(
        "nodes:\n  n1.example.com:\n    groups: [{name: G0, gpus: [0], seats: 2}]\n"
    ) == [
        "/etc/x.yaml: nodes[n1.example.com].groups[0].seats: unknown key "
        "(expected one of: name, gpus, seatsPerGroup)"
    ]


def test_an_override_is_validated_like_the_pool_wide_keys() -> None:
    found = problems(
        "nodes:\n"
        "  a: {seatsPerGroup: {kyb.ai/gpu-4x-seat: 2}}\n"
        "  b: {groups: [{name: G0, gpus: [0]}, {name: G0, gpus: [1]}]}\n"
        "  c: {drain: ['bad name']}\n"
        "  d: {drainGpus: ['7', -1, true]}\n"
        f"  e: {{seatsPerGroup: {{{R2}: 65}}}}\n"
        "  f: [G01]\n"
    )
    assert found[:2] == [
        "/etc/x.yaml: nodes.b.groups[1].name: duplicate group name 'G0' (also groups[0])",
        "/etc/x.yaml: nodes.c.drain[0]: must be 1-59 characters of letters, digits, '.', '_' "
        "or '-', starting with a letter or digit, got 'bad name'",
    ]
    assert found[2:5] == [
        "/etc/x.yaml: nodes.d.drainGpus[0]: must be a GPU UUID (GPU-...), or an index written "
        "as a number, got '7'",
        "/etc/x.yaml: nodes.d.drainGpus[1]: must be a GPU index >= 0 or a GPU UUID, got -1",
        "/etc/x.yaml: nodes.d.drainGpus[2]: must be a GPU index (a number) or a GPU UUID, got true",
    ]
    assert found[5:] == [
        f"/etc/x.yaml: nodes.e.seatsPerGroup[{R2}]: must be <= 64, got 65",
        "/etc/x.yaml: nodes.f: must be a mapping, got a list ['G01']",
    ]
    # Once the rest is right: a profile the config does not serve is named.
    assert problems("nodes:\n  a: {seatsPerGroup: {kyb.ai/gpu-4x-seat: 2}}\n") == [
        "/etc/x.yaml: nodes.a.seatsPerGroup[kyb.ai/gpu-4x-seat]: no profile serves "
        f"'kyb.ai/gpu-4x-seat' (profiles: {R1}, {R2})"
    ]


def test_a_groups_own_seat_count_is_bounded_like_a_profiles() -> None:
    assert problems("groups:\n  - {name: G0, gpus: [0], seatsPerGroup: 0}\n") == [
        "/etc/x.yaml: groups[0].seatsPerGroup: must be >= 1, got 0"
    ]
    config = loader.load_text(
        PROFILES + "groups:\n  - {name: G0, gpus: [0], seatsPerGroup: 64}\n", "x"
    )
    assert config.groups[0].seats_per_group == 64


def test_drain_gpus_takes_indices_and_uuids_from_the_file_a_flag_or_the_env() -> None:
    config = loader.load_text(PROFILES + "drainGpus: [3, GPU-0a1b]\n", "x")
    assert config.drain_gpus == (3, "GPU-0a1b")
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    overrides = flags.overrides_from(parser.parse_args(["--drain-gpus", "1,GPU-9"]), {})
    assert loader.load_text(PROFILES, "x", overrides).drain_gpus == (1, "GPU-9")
    overrides = flags.overrides_from(parser.parse_args([]), {"KYB_NODES": "{n1: {drain: [G0]}}"})
    assert loader.load_text(PROFILES, "x", overrides).for_node("n1").drain == ("G0",)


def test_the_config_source_gives_the_config_in_force_on_its_node(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(PROFILES + "drain: [G0]\nnodes:\n  gpu-a: {drain: [G1]}\n")
    assert ConfigSource(path, {}, "gpu-a").load().drain == ("G1",)
    assert ConfigSource(path, {}, "gpu-b").load().drain == ("G0",)
    assert ConfigSource(path, {}).load().drain == ("G0",)


def test_an_empty_config_round_trips_with_no_nodes() -> None:
    data = builtin_default().to_data()
    assert (data["nodes"], data["drainGpus"]) == ({}, [])
    assert Config.model_validate(data, by_alias=True, by_name=False) == builtin_default()
