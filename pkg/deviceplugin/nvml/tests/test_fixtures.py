"""The built-in fixtures: each loads, and each still describes the hardware it names."""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path

import pytest

from pkg.deviceplugin.nvml import fixtures
from pkg.deviceplugin.nvml.backend import NvmlError
from pkg.deviceplugin.nvml.topofile import load_topology_file
from pkg.deviceplugin.types import Link, LinkKind, Topology

UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def topo(name: str) -> Topology:
    return load_topology_file(fixtures.fixture_path(name)).topology()


def pairs_with(t: Topology, kind: LinkKind) -> set[tuple[int, int]]:
    return {(a, b) for a, b in combinations(t.indices, 2) if t.link(a, b).kind is kind}


def test_every_name_has_a_data_file_and_every_data_file_a_name() -> None:
    on_disk = {p.stem for p in fixtures.fixture_path("no-gpu").parent.glob("*.yaml")}
    assert on_disk == set(fixtures.FIXTURES)


@pytest.mark.parametrize("name", fixtures.FIXTURES)
def test_each_fixture_is_plausible_hardware(name: str) -> None:
    t = topo(name)
    assert t.indices == tuple(range(len(t.gpus)))
    for gpu in t.gpus:
        assert UUID.match(gpu.uuid), gpu.uuid
        assert gpu.memory_mib > 10_000
        assert gpu.name.startswith(("NVIDIA ", "Tesla "))
    # NVML numbers GPUs in PCI order, so bus ids rise with the index.
    assert [g.pci_bus_id for g in t.gpus] == sorted(g.pci_bus_id for g in t.gpus)


def test_some_fixture_has_minor_numbers_that_differ_from_the_index() -> None:
    assert any(g.minor != g.index for g in topo("dgx-a100").gpus)


@pytest.mark.parametrize(
    ("name", "count", "word"),
    [
        ("dgx-a100", 8, "NV12"),
        ("dgx-h100", 8, "NV18"),
        ("nvswitch-16", 16, "NV6"),
    ],
)
def test_nvswitch_systems_link_every_pair_alike(name: str, count: int, word: str) -> None:
    t = topo(name)
    assert len(t.gpus) == count
    assert {t.link(a, b) for a, b in combinations(t.indices, 2)} == {Link.parse(word)}
    half = count // 2
    assert [g.numa_node for g in t.gpus] == [0] * half + [1] * half


def test_dgx1_is_the_hybrid_cube_mesh_with_six_nvlinks_per_gpu() -> None:
    t = topo("dgx1-v100")
    for a in t.indices:
        links = [t.link(a, b) for b in t.indices if b != a]
        assert sum(link.nvlinks for link in links) == 6
        assert sorted(link.word for link in links).count("SYS") == 3
    assert t.link(0, 3).word == "NV2" and t.link(0, 1).word == "NV1" and t.link(0, 4).word == "NV2"


def test_nvlink_pairs_beat_a_pcie_switch_that_joins_the_pairs() -> None:
    t = topo("nvlink-pairs-4")
    assert pairs_with(t, LinkKind.NVLINK) == {(0, 1), (2, 3)}
    assert t.link(1, 2).kind is LinkKind.PIX


def test_pcie_2numa_has_no_nvlink_and_crosses_sockets_with_sys() -> None:
    t = topo("pcie-2numa-4")
    assert not pairs_with(t, LinkKind.NVLINK)
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1]
    assert pairs_with(t, LinkKind.SYS) == {(0, 2), (0, 3), (1, 2), (1, 3)}


def test_pcie_switch_pairs_are_not_index_adjacent() -> None:
    assert pairs_with(topo("pcie-switch-pairs-8"), LinkKind.PIX) == {(0, 2), (1, 3), (4, 6), (5, 7)}


def test_single_and_no_gpu_fixtures() -> None:
    assert len(topo("single-gpu").gpus) == 1
    assert topo("no-gpu") == Topology(())


def test_flaky_4_scripts_a_lost_gpu_that_returns_and_a_critical_xid() -> None:
    faults = load_topology_file(fixtures.fixture_path("flaky-4")).faults
    assert [(f.gpu, f.kind, f.at, f.recovers_at, f.xid) for f in faults] == [
        (2, "lost", 1.0, 3.0, None),
        (1, "xid", 1.5, None, 79),
    ]


def test_resolve_takes_a_built_in_name_or_an_existing_file(tmp_path: Path) -> None:
    assert fixtures.resolve("dgx-a100") == fixtures.fixture_path("dgx-a100")
    own = tmp_path / "mine.yaml"
    own.write_text("gpus: []\nlinks: []\n")
    assert fixtures.resolve(str(own)) == own
    assert fixtures.resolve(own) == own


def test_an_unknown_name_lists_the_built_in_ones() -> None:
    with pytest.raises(NvmlError, match="'dgx-z9' is neither a built-in fixture") as info:
        fixtures.resolve("dgx-z9")
    assert all(name in str(info.value) for name in fixtures.FIXTURES)
    with pytest.raises(NvmlError, match="unknown NVML mock fixture 'x' \\(built in: dgx-a100, "):
        fixtures.fixture_path("x")
