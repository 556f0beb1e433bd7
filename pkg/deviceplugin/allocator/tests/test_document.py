"""The typed documents say what the board writes and the store loads, key for key:
every key a document has is declared at its level, and every required one is there."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints, is_typeddict

from pkg.deviceplugin import report
from pkg.deviceplugin.allocator import document, layout
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import Holder
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import STATE_FILE, StateStore
from pkg.deviceplugin.allocator.tests.support import R1, R2, MakeBoard, allocate, seed_layout
from pkg.deviceplugin.types import DeviceId, GroupName, SetAsideGpu


def problems(value: object, shape: Any, where: str = "") -> list[str]:
    """Where ``value`` does not have the keys ``shape`` (a TypedDict, or a dict, list
    or union of them) declares."""
    if is_typeddict(shape):
        if not isinstance(value, Mapping):
            return [f"{where}: not an object"]
        found: list[str] = []
        declared = shape.__required_keys__ | shape.__optional_keys__
        found += [
            f"{where}/{k}: not declared in {shape.__name__}" for k in value if k not in declared
        ]
        found += [f"{where}/{k}: missing" for k in shape.__required_keys__ if k not in value]
        hints = get_type_hints(shape)
        for key in declared & set(value):
            found += problems(value[key], hints[key], f"{where}/{key}")
        return found
    origin, args = get_origin(shape), get_args(shape)
    if origin is dict and isinstance(value, Mapping):
        return [p for k, v in value.items() for p in problems(v, args[1], f"{where}/{k}")]
    if origin is list and isinstance(value, list):
        return [p for i, v in enumerate(value) for p in problems(v, args[0], f"{where}/{i}")]
    typed = [a for a in args if is_typeddict(a)]
    if typed and isinstance(value, Mapping):  # a TypedDict or None
        return problems(value, typed[0], where)
    return []


def busy_board(make_board: MakeBoard) -> SeatBoard:
    """Every kind of seat and group: held (seen and not), fenced, drained, unhealthy,
    a seat the config no longer has (its group only the binding keeps), set-aside GPUs."""
    board = make_board()
    allocate(board, R1, [["G0-s0"]])
    allocate(board, R2, [["G23-s2"]])
    board.reconcile(
        {
            (R1, DeviceId("G0-s0")): Holder("ns", "pod", "main"),
            (R2, DeviceId("G23-s2")): Holder("ns", "big", "main"),
        }
    )
    allocate(board, R1, [["G1-s3"]])  # never seen
    board.set_unhealthy({board.layout.topology.gpu(3).uuid: "is off the bus (Xid 79)"})
    board.set_aside_gpus([SetAsideGpu(7, "GPU-7", "a MIG-enabled GPU")])
    fewer = layout.build(
        [layout.ProfileSpec(R1, 1, 4), layout.ProfileSpec(R2, 2, 1)],
        [layout.GroupSpec(GroupName("G01"), (0, 1)), layout.GroupSpec(GroupName("G23"), (2, 3))],
        seed_layout().topology,
    )
    board.apply(plan=fewer, policy=Policy(drain=frozenset({GroupName("G0")})))
    states = {view.state for r in (R1, R2) for view in board.seat_views(r).values()}
    assert states == {"free", "held", "fenced", "drained", "unhealthy"}
    return board


def test_the_status_is_a_status_doc(make_board: MakeBoard) -> None:
    status = busy_board(make_board).status()
    assert problems(status, document.StatusDoc) == []
    assert status["setAsideGpus"] and status["resources"][R1]["groups"]["G0"]["seats"]


def test_the_state_file_is_a_status_doc_with_ledger_detail(
    make_board: MakeBoard, tmp_path: Path
) -> None:
    busy_board(make_board).flush()
    saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    ledger_detail = {"retired", "updatedAt", "generationFloor", "version", "cleanStop"}
    assert (
        problems({k: v for k, v in saved.items() if k not in ledger_detail}, document.StatusDoc)
        == []
    )
    seat = saved["resources"][R1]["groups"]["G0"]["seats"]["G0-s0"]
    assert seat["binding"]["holder"] == {"namespace": "ns", "pod": "pod", "container": "main"}


def test_what_the_store_loads_is_a_loaded_state(make_board: MakeBoard, tmp_path: Path) -> None:
    busy_board(make_board).flush()
    loaded = StateStore(tmp_path / "state").load()
    assert loaded is not None
    assert problems(loaded, document.LoadedState) == []
    assert loaded["resources"][R2]["groups"]["G23"]["seats"]["G23-s2"]["binding"]


def test_the_checker_finds_a_key_the_type_does_not_declare() -> None:
    doc = {"resources": {R1: {"groups": {"G0": {"gpus": [0], "seats": {}, "colour": "red"}}}}}
    found = problems(doc, document.StatusDoc)
    assert f"/resources/{R1}/groups/G0/colour: not declared in GroupDoc" in found
    assert f"/resources/{R1}/groups/G0/health: missing" in found


def test_the_status_names_a_seats_holder_once_seen_and_the_state_file_keeps_it_in_binding(
    make_board: MakeBoard, tmp_path: Path
) -> None:
    """Issue 15 point 4: ``status`` (and the ``kyb_seat_holder`` metric built from it)
    says who holds a seat; the state file keeps saying it in the seat's ``binding``."""
    board = busy_board(make_board)
    seats = board.status()["resources"][R1]["groups"]["G0"]["seats"]
    assert seats["G0-s0"]["holder"] == {"namespace": "ns", "pod": "pod", "container": "main"}
    never_seen = board.status()["resources"][R1]["groups"]["G1"]["seats"]["G1-s3"]
    assert never_seen["state"] == "held" and "holder" not in never_seen
    board.flush()
    saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    assert "holder" not in saved["resources"][R1]["groups"]["G0"]["seats"]["G0-s0"]
    assert report.status_view(saved) == json.loads(json.dumps(board.status()))
