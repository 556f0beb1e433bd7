"""Auto grouping: exact optimum, deterministic ties, names that never collide."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkg.deviceplugin.topology import grouping
from pkg.deviceplugin.topology.grouping import Grouping
from pkg.deviceplugin.types import Gpu, Topology

LINK_WORDS = [
    "NV1", "NV2", "NV3", "NV4", "NV6", "NV8", "NV12", "NV18",
    "PIX", "PXB", "PHB", "NODE", "SYS",
]  # fmt: skip

# The real `nvidia-smi topo -m` of a DGX-1 with V100s (hybrid cube-mesh), GPU columns only.
DGX1_V100 = """
X   NV1 NV1 NV2 NV2 SYS SYS SYS
NV1 X   NV2 NV1 SYS NV2 SYS SYS
NV1 NV2 X   NV2 SYS SYS NV1 SYS
NV2 NV1 NV2 X   SYS SYS SYS NV1
NV2 SYS SYS SYS X   NV1 NV1 NV2
SYS NV2 SYS SYS NV1 X   NV2 NV1
SYS SYS NV1 SYS NV1 NV2 X   NV2
SYS SYS SYS NV1 NV2 NV1 NV2 X
"""

# Two PCIe switches per socket, wired so that switch partners are not index neighbours.
PCIE_SWITCH_PAIRS = """
X    NODE PIX  NODE SYS  SYS  SYS  SYS
NODE X    NODE PIX  SYS  SYS  SYS  SYS
PIX  NODE X    NODE SYS  SYS  SYS  SYS
NODE PIX  NODE X    SYS  SYS  SYS  SYS
SYS  SYS  SYS  SYS  X    PXB  PIX  PXB
SYS  SYS  SYS  SYS  PXB  X    PXB  PIX
SYS  SYS  SYS  SYS  PIX  PXB  X    PXB
SYS  SYS  SYS  SYS  PXB  PIX  PXB  X
"""


def make_gpus(indices: Sequence[int]) -> list[Gpu]:
    return [
        Gpu(
            index=index,
            uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
            name="NVIDIA Test GPU",
            memory_mib=81559,
            pci_bus_id=f"00000000:{index + 0x10:02X}:00.0",
            minor=index,
        )
        for index in indices
    ]


def topology_from_text(text: str) -> Topology:
    rows = [line.split() for line in text.strip().splitlines()]
    return Topology.from_matrix(make_gpus(range(len(rows))), rows)


def uniform_topology(count: int, word: str) -> Topology:
    rows = [["X" if i == j else word for j in range(count)] for i in range(count)]
    return Topology.from_matrix(make_gpus(range(count)), rows)


def score(topology: Topology, groups: Grouping) -> int:
    return grouping.grouping_score(topology, groups)


def brute_force(topology: Topology, size: int, gpus: Sequence[int]) -> tuple[int, Grouping]:
    """Every choice of len(gpus) // size disjoint groups; the best, lexicographically first."""
    candidates = list(itertools.combinations(sorted(gpus), size))
    best: tuple[int, Grouping] | None = None
    for choice in itertools.combinations(candidates, len(gpus) // size):
        members = [index for group in choice for index in group]
        if len(set(members)) != len(members):
            continue
        value = score(topology, choice)
        if best is None or value > best[0]:
            best = (value, choice)
    assert best is not None
    return best


def greedy_pairs(topology: Topology) -> Grouping:
    """The tempting shortcut: keep taking the best-linked pair that is still free."""
    free = set(topology.indices)
    pairs: list[tuple[int, int]] = []
    while len(free) >= 2:
        pair = max(
            itertools.combinations(sorted(free), 2),
            key=lambda p: topology.link(*p).score,
        )
        pairs.append(pair)
        free -= set(pair)
    return tuple(sorted(pairs))


def assert_valid(result: Grouping, gpus: Sequence[int], size: int) -> None:
    assert len(result) == len(gpus) // size
    assert all(len(group) == size for group in result)
    assert all(list(group) == sorted(group) for group in result)
    assert [group[0] for group in result] == sorted(group[0] for group in result)
    members = [index for group in result for index in group]
    assert len(set(members)) == len(members)
    assert set(members) <= set(gpus)


@st.composite
def topologies(draw: st.DrawFn) -> tuple[Topology, list[int]]:
    """A random symmetric topology of up to 8 GPUs (indices need not be 0..n-1)."""
    indices = sorted(draw(st.sets(st.integers(0, 15), min_size=1, max_size=8)))
    words = {pair: draw(st.sampled_from(LINK_WORDS)) for pair in itertools.combinations(indices, 2)}
    rows = [["X" if a == b else words[(min(a, b), max(a, b))] for b in indices] for a in indices]
    return Topology.from_matrix(make_gpus(indices), rows), indices


@settings(max_examples=150, deadline=None)
@given(case=topologies(), size=st.sampled_from([1, 2, 4]))
def test_partition_matches_brute_force_optimum_on_random_topologies(
    case: tuple[Topology, list[int]], size: int
) -> None:
    topology, indices = case
    result = grouping.partition(topology, size)
    assert_valid(result, indices, size)
    best_score, best_groups = brute_force(topology, size, indices)
    assert score(topology, result) == best_score
    assert result == best_groups


@settings(max_examples=60, deadline=None)
@given(case=topologies(), size=st.sampled_from([2, 4]), data=st.data())
def test_partition_of_a_subset_only_uses_that_subset(
    case: tuple[Topology, list[int]], size: int, data: st.DataObject
) -> None:
    topology, indices = case
    subset = data.draw(st.lists(st.sampled_from(indices), unique=True))
    result = grouping.partition(topology, size, subset)
    assert_valid(result, subset, size)
    assert score(topology, result) == brute_force(topology, size, subset)[0]


def test_dgx1_pairs_beat_index_adjacent_pairs() -> None:
    topology = topology_from_text(DGX1_V100)
    adjacent = ((0, 1), (2, 3), (4, 5), (6, 7))
    result = grouping.partition(topology, 2)
    assert result == ((0, 3), (1, 2), (4, 7), (5, 6))
    assert score(topology, result) == 4 * 102  # every pair on a double NVLink
    assert score(topology, adjacent) == 2 * 101 + 2 * 102
    assert score(topology, result) > score(topology, adjacent)


def test_dgx1_quads_are_the_two_fully_nvlinked_halves() -> None:
    topology = topology_from_text(DGX1_V100)
    assert grouping.partition(topology, 4) == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_dgx1_with_half_its_gpus_taken_beats_greedy_best_pair_first() -> None:
    # Left with GPUs 0, 1, 4 and 6, greedy grabs the double NVLink 0-4 and strands
    # 1 and 6 on SYS; pairing 0-1 and 4-6 keeps both pairs on NVLink.
    topology = topology_from_text(DGX1_V100)
    free = [0, 1, 4, 6]
    remaining = Topology.from_matrix(
        make_gpus(free), [[topology.link(a, b) for b in free] for a in free]
    )
    greedy = greedy_pairs(remaining)
    assert greedy == ((0, 4), (1, 6))
    result = grouping.partition(topology, 2, free)
    assert result == ((0, 1), (4, 6))
    assert score(topology, greedy) == 102 + 1
    assert score(topology, result) == 101 + 101
    assert score(topology, greedy) < score(topology, result)


def test_pcie_switch_partners_are_paired_even_when_not_index_neighbours() -> None:
    topology = topology_from_text(PCIE_SWITCH_PAIRS)
    assert grouping.partition(topology, 2) == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert grouping.partition(topology, 4) == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_five_gpus_into_pairs_leave_out_the_worst_connected_one() -> None:
    topology = topology_from_text(
        """
        X   SYS SYS SYS SYS
        SYS X   NV2 PHB PHB
        SYS NV2 X   PHB PHB
        SYS PHB PHB X   NV2
        SYS PHB PHB NV2 X
        """
    )
    assert grouping.partition(topology, 2) == ((1, 2), (3, 4))


def test_leftovers_are_chosen_by_link_quality_not_index() -> None:
    # Six GPUs into quads: the four on one switch form the group, wherever they sit.
    topology = topology_from_text(
        """
        X    PIX  SYS  PIX  SYS  PIX
        PIX  X    SYS  PIX  SYS  PIX
        SYS  SYS  X    SYS  PHB  SYS
        PIX  PIX  SYS  X    SYS  PIX
        SYS  SYS  PHB  SYS  X    SYS
        PIX  PIX  SYS  PIX  SYS  X
        """
    )
    assert grouping.partition(topology, 4) == ((0, 1, 3, 5),)


def test_equal_links_group_by_index_order() -> None:
    topology = uniform_topology(8, "NV12")
    assert grouping.partition(topology, 2) == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert grouping.partition(topology, 4) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert grouping.partition(topology, 8) == ((0, 1, 2, 3, 4, 5, 6, 7),)
    assert grouping.partition(topology, 2, [0, 1, 2, 3, 4]) == ((0, 1), (2, 3))


def test_sixteen_gpus_group_exactly() -> None:
    topology = uniform_topology(16, "NV18")
    assert grouping.partition(topology, 4) == tuple(
        tuple(range(start, start + 4)) for start in range(0, 16, 4)
    )
    assert grouping.partition(topology, 8) == (tuple(range(8)), tuple(range(8, 16)))
    assert grouping.partition(topology, 1) == tuple((index,) for index in range(16))


def test_fewer_gpus_than_a_group_give_no_group() -> None:
    topology = uniform_topology(3, "NV4")
    assert grouping.partition(topology, 4) == ()
    assert grouping.partition(topology, 2, []) == ()


@pytest.mark.parametrize("size", [0, 3, 5, 16])
def test_unsupported_group_size_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="group size"):
        grouping.partition(uniform_topology(4, "PIX"), size)


def test_unknown_or_repeated_gpus_are_refused() -> None:
    topology = uniform_topology(4, "PIX")
    with pytest.raises(ValueError, match=r"\[7\] are not in the topology"):
        grouping.partition(topology, 2, [0, 7])
    with pytest.raises(ValueError, match="listed twice"):
        grouping.partition(topology, 2, [0, 1, 1])


def test_more_gpus_than_the_exact_search_handles_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 16 GPUs"):
        grouping.partition(uniform_topology(17, "SYS"), 2)


@pytest.mark.parametrize(
    ("members", "name"),
    [
        ((0, 1), "G01"),
        ((2, 3, 0, 1), "G0123"),
        ((5,), "G5"),
        ((10, 11), "G10-11"),
        ((9, 10), "G9-10"),
        ((1, 12), "G1-12"),
        ((12,), "G12"),
        ((1, 2), "G12"),
    ],
)
def test_group_name(members: tuple[int, ...], name: str) -> None:
    assert grouping.group_name(members) == name


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_group_names_never_collide_within_a_size(size: int) -> None:
    names = [grouping.group_name(m) for m in itertools.combinations(range(16), size)]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("count", [8, 10])
def test_group_names_never_collide_across_sizes_up_to_ten_gpus(count: int) -> None:
    indices = range(count)
    names = [
        grouping.group_name(members)
        for size in (1, 2, 4, 8)
        for members in itertools.combinations(indices, size)
    ]
    assert len(set(names)) == len(names)


def test_group_name_needs_members() -> None:
    with pytest.raises(ValueError, match="at least one GPU"):
        grouping.group_name([])
