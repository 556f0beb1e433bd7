from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pkg.deviceplugin.allocator import placement
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import Holder
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.tests.support import R1, R2, MakeBoard, allocate
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName

ALL_1X = [DeviceId(f"G{g}-s{k}") for g in range(4) for k in range(4)]


def _hold(board: SeatBoard, resource: ResourceName, *ids: str) -> None:
    for device_id in ids:
        allocate(board, resource, [[device_id]])
    board.reconcile({(resource, DeviceId(d)): Holder("ns", d, "c") for d in ids})


def test_spread_prefers_the_group_with_the_fewest_held_seats(make_board: MakeBoard) -> None:
    board = make_board(Policy(allow_overprovision=True))
    _hold(board, R1, "G0-s0", "G0-s1", "G1-s0", "G2-s0")
    available = [d for d in ALL_1X if d not in {"G0-s0", "G0-s1", "G1-s0", "G2-s0"}]
    assert board.preferred(R1, available, [], 1) == ["G3-s0"]


def test_pack_prefers_the_busiest_group_to_keep_whole_groups_free(make_board: MakeBoard) -> None:
    board = make_board(Policy(allow_overprovision=True, placement="pack"))
    _hold(board, R1, "G0-s0", "G0-s1", "G1-s0")
    available = [d for d in ALL_1X if d not in {"G0-s0", "G0-s1", "G1-s0"}]
    assert board.preferred(R1, available, [], 1) == ["G0-s2"]


def test_several_seats_go_to_distinct_groups_close_in_topology(make_board: MakeBoard) -> None:
    board = make_board()
    chosen = board.preferred(R1, ALL_1X, [], 2)
    assert len({c.split("-")[0] for c in chosen}) == 2
    # G0 and G1 share an NVLink; G0 and G2/G3 only SYS.
    assert chosen == ["G0-s0", "G1-s0"]


def test_must_include_is_honoured_and_completed(make_board: MakeBoard) -> None:
    board = make_board()
    chosen = board.preferred(R1, ALL_1X, [DeviceId("G2-s3")], 2)
    assert chosen[0] == "G2-s3"
    assert chosen[1] == "G3-s0"


def test_never_returns_an_id_outside_available(make_board: MakeBoard) -> None:
    board = make_board()
    available = [DeviceId("G1-s1"), DeviceId("G3-s2"), DeviceId("bogus")]
    chosen = board.preferred(R1, available, [DeviceId("G0-s0")], 3)
    assert set(chosen) <= set(available)
    assert len(chosen) == 2


def test_bad_seats_come_last(make_board: MakeBoard) -> None:
    board = make_board()
    _hold(board, R1, "G0-s0")  # fences G01 in the 2x profile
    chosen = board.preferred(
        R2, [DeviceId("G01-s0"), DeviceId("G01-s1"), DeviceId("G23-s2")], [], 1
    )
    assert chosen == ["G23-s2"]


def _seat_by_seat(
    seats: list[tuple[str, str, bool, int]],
    must_include: list[str],
    size: int,
    strategy: placement.Strategy,
    closeness: Callable[[str, str], int],
) -> list[str]:
    """The reference: rank every seat (device ID, group, good, held in group) on its own."""
    by_id = {s[0]: s for s in seats}
    chosen = [by_id[d] for d in dict.fromkeys(must_include) if d in by_id][:size]
    extra: dict[str, int] = {}
    for s in chosen:
        extra[s[1]] = extra.get(s[1], 0) + 1
    remaining = [s for s in seats if s not in chosen]
    sign = 1 if strategy == "spread" else -1
    while len(chosen) < size and remaining:
        groups = {s[1] for s in chosen}

        def key(s: tuple[str, str, bool, int], groups: set[str] = groups) -> tuple[Any, ...]:
            near = max((closeness(s[1], g) for g in groups), default=0)
            number = int(s[0].rpartition("-s")[2])
            return (
                not s[2],
                s[1] in groups,
                sign * (s[3] + extra.get(s[1], 0)),
                -near,
                s[1],
                number,
            )

        best = min(remaining, key=key)
        remaining.remove(best)
        chosen.append(best)
        extra[best[1]] = extra.get(best[1], 0) + 1
    return [s[0] for s in chosen]


@st.composite
def _offers(draw: st.DrawFn) -> tuple[list[tuple[str, str, bool, int]], list[str]]:
    groups = [f"G{i}" for i in range(draw(st.integers(1, 6)))]
    held = {g: draw(st.integers(0, 3)) for g in groups}
    ids = draw(
        st.lists(st.tuples(st.sampled_from(groups), st.integers(0, 7)), unique=True, max_size=30)
    )
    seats = [(f"{g}-s{k}", g, draw(st.booleans()), held[g]) for g, k in ids]
    must = draw(st.lists(st.sampled_from([s[0] for s in seats] + ["G9-s0"]), max_size=3))
    return seats, must


@given(
    offer=_offers(),
    size=st.integers(0, 8),
    strategy=st.sampled_from(["spread", "pack"]),
    links=st.dictionaries(st.tuples(st.integers(0, 5), st.integers(0, 5)), st.integers(0, 9)),
)
def test_ranking_groups_picks_what_ranking_every_seat_picks(
    offer: tuple[list[tuple[str, str, bool, int]], list[str]],
    size: int,
    strategy: placement.Strategy,
    links: dict[tuple[int, int], int],
) -> None:
    seats, must = offer

    def closeness(a: str, b: str) -> int:
        return links.get((int(a[1:]), int(b[1:])), 0)

    pools: dict[tuple[str, bool], list[str]] = {}
    for device_id, group, good, _ in seats:
        pools.setdefault((group, good), []).append(device_id)
    held = {s[1]: s[3] for s in seats}
    candidates = [
        placement.Candidate(GroupName(g), good, held[g], tuple(DeviceId(d) for d in ids))
        for (g, good), ids in pools.items()
    ]
    chosen = placement.choose(
        candidates,
        [DeviceId(d) for d in must],
        size,
        strategy=strategy,
        closeness=closeness,
    )
    assert chosen == _seat_by_seat(seats, must, size, strategy, closeness)
