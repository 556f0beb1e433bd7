from __future__ import annotations

from pkg.deviceplugin.allocator.board import Policy
from pkg.deviceplugin.allocator.ledger import Holder
from pkg.deviceplugin.allocator.tests.support import R1, R2, MakeBoard
from pkg.deviceplugin.types import DeviceId

ALL_1X = [f"G{g}-s{k}" for g in range(4) for k in range(4)]


def _hold(board, resource, *ids: str) -> None:  # type: ignore[no-untyped-def]
    for device_id in ids:
        board.allocate(resource, [[device_id]])
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
    chosen = board.preferred(R1, ALL_1X, ["G2-s3"], 2)
    assert chosen[0] == "G2-s3"
    assert chosen[1] == "G3-s0"


def test_never_returns_an_id_outside_available(make_board: MakeBoard) -> None:
    board = make_board()
    available = ["G1-s1", "G3-s2", "bogus"]
    chosen = board.preferred(R1, available, ["G0-s0"], 3)
    assert set(chosen) <= set(available)
    assert len(chosen) == 2


def test_bad_seats_come_last(make_board: MakeBoard) -> None:
    board = make_board()
    _hold(board, R1, "G0-s0")  # fences G01 in the 2x profile
    chosen = board.preferred(R2, ["G01-s0", "G01-s1", "G23-s2"], [], 1)
    assert chosen == ["G23-s2"]
