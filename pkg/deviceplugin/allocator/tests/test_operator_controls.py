"""The operator's controls per GPU and per group (issue 15 points 2 and 3): a drained
GPU takes every group containing it, in every profile, out of new allocations; an
explicit group's own seat count replaces its profile's for that group alone; and the
status says which node override is in force."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pkg.deviceplugin.allocator import document, layout, views
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import SeatKey
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import (
    R1,
    R2,
    R4,
    Clock,
    MakeBoard,
    allocate,
    four_gpus_in_nvlink_pairs,
    model_examples,
    seed_layout,
    three_profiles,
)
from pkg.deviceplugin.allocator.tests.test_document import problems
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName

TOPOLOGY = four_gpus_in_nvlink_pairs()


def states(board: SeatBoard, resource: ResourceName, group: str) -> dict[str, str]:
    return {
        view.device_id: view.state
        for view in board.seat_views(resource).values()
        if view.group == group
    }


# ---- drainGpus -------------------------------------------------------------------


@pytest.mark.parametrize("ref", [1, TOPOLOGY.gpu(1).uuid], ids=["index", "uuid"])
def test_a_drained_gpu_drains_its_groups_in_every_profile_and_says_why(
    make_board: MakeBoard, ref: int | str
) -> None:
    board = make_board(lay=three_profiles())
    allocate(board, R2, [["G01-s0"]])  # held before the drain: stays held
    board.apply(policy=Policy(allow_overprovision=True, drain_gpus=frozenset({ref})))
    assert set(states(board, R1, "G1").values()) == {"drained"}
    assert states(board, R2, "G01") == {"G01-s0": "held", "G01-s1": "drained", "G01-s2": "drained"}
    assert set(states(board, R4, "G0123").values()) == {"drained"}
    # Groups without that GPU are untouched.
    assert set(states(board, R1, "G0").values()) == {"free"}
    assert set(states(board, R2, "G23").values()) == {"free"}
    why = f"GPU 1 ({TOPOLOGY.gpu(1).uuid}) is draining"
    assert board.seat_views(R1)[DeviceId("G1-s2")].why == why
    doc = board.status()
    group = doc["resources"][R4]["groups"]["G0123"]
    assert (group["drained"], group.get("drainedWhy")) == (True, why)
    assert "drainedWhy" not in doc["resources"][R1]["groups"]["G0"]
    with pytest.raises(AllocationError, match="is draining"):
        allocate(board, R1, [["G1-s0"]])
    # The held seat's repeat (the init-to-app hand-off) still gets its binding.
    assert allocate(board, R2, [["G01-s0"]])[0].envs["KYB_SEAT_GEN"] == "1"


def test_a_group_drained_by_name_and_by_gpu_gives_both_reasons(make_board: MakeBoard) -> None:
    board = make_board(lay=three_profiles())
    board.apply(policy=Policy(drain=frozenset({GroupName("G01")}), drain_gpus=frozenset({0})))
    group = board.status()["resources"][R2]["groups"]["G01"]
    assert group.get("drainedWhy") == (
        f"group G01 is draining; GPU 0 ({TOPOLOGY.gpu(0).uuid}) is draining"
    )


def test_undraining_a_gpu_frees_its_groups_again(make_board: MakeBoard) -> None:
    board = make_board(lay=three_profiles())
    board.apply(policy=Policy(drain_gpus=frozenset({3})))
    assert set(states(board, R1, "G3").values()) == {"drained"}
    board.apply(policy=Policy())
    assert set(states(board, R1, "G3").values()) == {"free"}
    assert board.status()["resources"][R1]["groups"]["G3"]["drained"] is False


class DrainMachine(RuleBasedStateMachine):
    """Whatever is allocated, drained and undrained in whatever order: no seat of a
    group containing a drained GPU is ever newly bound, in any profile."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.board = SeatBoard(
            three_profiles(seats_g01=2),
            Policy(allow_overprovision=True),
            StateStore(Path(tempfile.mkdtemp(prefix="kyb-drain-"))),
            release_grace_s=60,
            clock=self.clock,
            monotonic=self.clock,
        )
        self.drained: frozenset[int | str] = frozenset()

    @rule(refs=st.sets(st.sampled_from([0, 1, 2, 3, *(g.uuid for g in TOPOLOGY.gpus)])))
    def drain(self, refs: set[int | str]) -> None:
        self.drained = frozenset(refs)
        self.board.apply(policy=Policy(allow_overprovision=True, drain_gpus=self.drained))

    @rule(
        resource=st.sampled_from([R1, R2, R4]),
        group=st.sampled_from(["G0", "G1", "G2", "G3", "G01", "G23", "G0123"]),
        k=st.integers(0, 3),
    )
    def allocate(self, resource: ResourceName, group: str, k: int) -> None:
        key: SeatKey = (resource, DeviceId(f"{group}-s{k}"))
        before = self.board.seat_views(resource).get(key[1])
        with contextlib.suppress(AllocationError):
            allocate(self.board, resource, [[key[1]]])
            seat = self.board.layout.seat(*key)
            assert seat is not None
            drained_gpus = [
                g for g in seat.group.gpus if g.index in self.drained or g.uuid in self.drained
            ]
            newly_bound = before is None or before.state != "held"
            assert not (newly_bound and drained_gpus), (key, drained_gpus)

    @rule()
    def grace_passes_and_every_seat_is_released(self) -> None:
        self.clock.now += 61
        self.board.reconcile({})

    @invariant()
    def a_drained_gpus_groups_offer_no_free_seat(self) -> None:
        for resource, group in self.board.layout.groups():
            if any(g.index in self.drained or g.uuid in self.drained for g in group.gpus):
                shown = states(self.board, resource, group.name)
                assert "free" not in shown.values(), (resource, group.name, shown)


DrainMachine.TestCase.settings = settings(
    max_examples=model_examples(60), stateful_step_count=25, deadline=None
)
TestDrainedGpus = DrainMachine.TestCase


# ---- seats per group ---------------------------------------------------------------


def test_a_groups_own_seat_count_replaces_its_profiles_for_that_group_only() -> None:
    built = three_profiles(seats_g01=5)
    assert [s.device_id for s in built.seats(R2)] == [
        *(f"G01-s{k}" for k in range(5)),
        *(f"G23-s{k}" for k in range(3)),
    ]
    # The other profiles keep their counts; the 2x profile's other group too.
    assert len(built.seats(R1)) == 16 and len(built.seats(R4)) == 2
    places = views.places(built)
    assert (places[(R2, GroupName("G01"))].offset, places[(R2, GroupName("G01"))].seats) == (0, 5)
    assert (places[(R2, GroupName("G23"))].offset, places[(R2, GroupName("G23"))].seats) == (5, 3)


def test_a_seat_count_under_the_kubelets_device_list_order(make_board: MakeBoard) -> None:
    """ListAndWatch shows each group's seats in order, the next group's after them."""
    board = make_board(lay=three_profiles(seats_g01=1, seats_2x=4))
    assert [d.device_id for d in board.devices(R2)] == [
        "G01-s0",
        "G23-s0",
        "G23-s1",
        "G23-s2",
        "G23-s3",
    ]


def test_lowering_a_groups_seat_count_under_held_seats_keeps_them_until_released(
    make_board: MakeBoard, clock: Clock
) -> None:
    board = make_board(lay=three_profiles(seats_g01=4))
    allocate(board, R2, [["G01-s3"]])
    allocate(board, R2, [["G23-s2"]])
    board.apply(plan=three_profiles(seats_g01=2))
    shown = states(board, R2, "G01")
    assert shown == {"G01-s0": "free", "G01-s1": "free", "G01-s3": "unhealthy"}
    assert board.seat_views(R2)[DeviceId("G01-s3")].why.startswith("seat no longer in the config")
    # Only G01 changed; G23's held seat is as it was.
    assert states(board, R2, "G23")["G23-s2"] == "held"
    with pytest.raises(AllocationError, match="unknown device"):
        allocate(board, R2, [["G01-s2"]])
    board.reconcile({})
    assert "G01-s3" in board.seat_views(R2)
    clock.now += 61  # never seen in PodResources: released after the grace period
    board.reconcile({})
    assert states(board, R2, "G01") == {"G01-s0": "free", "G01-s1": "free"}


def test_a_held_over_group_keeps_its_profiles_seat_count(make_board: MakeBoard) -> None:
    """G01's own count belongs to G01 as configured: a held G01 on other GPUs (the config
    moved it) shows the profile's count until it is released."""
    board = make_board(lay=seed_layout())
    allocate(board, R2, [["G01-s0"]])
    profiles = [layout.ProfileSpec(R1, 1, 4), layout.ProfileSpec(R2, 2, 3)]
    specs = [
        layout.GroupSpec(GroupName("G01"), (1, 2), 5),
        layout.GroupSpec(GroupName("G03"), (0, 3)),
    ]
    board.apply(plan=lambda pins: layout.build(profiles, specs, TOPOLOGY, pins))
    assert len(states(board, R2, "G01")) == 3
    assert board.layout.held_over


def test_a_device_id_too_long_for_a_groups_own_count_is_refused() -> None:
    name = GroupName("G" * 60)
    layout.build([layout.ProfileSpec(R1, 1, 10)], [layout.GroupSpec(name, (0,), 10)], TOPOLOGY)
    with pytest.raises(layout.LayoutError, match=r"'G{60}-s10' is longer than 63"):
        layout.build([layout.ProfileSpec(R1, 1, 10)], [layout.GroupSpec(name, (0,), 11)], TOPOLOGY)


# ---- the node in the status ------------------------------------------------------------


def test_the_status_names_the_node_and_its_override_in_force(
    make_board: MakeBoard, tmp_path: Path
) -> None:
    board = make_board(lay=three_profiles())
    assert "node" not in board.status() and "override" not in board.status()
    override: document.OverrideDoc = {"drainGpus": [1], "seatsPerGroup": {R2: 2}}
    board.apply(policy=Policy(drain_gpus=frozenset({1}), node="gpu-a", override=override))
    doc = board.status()
    assert (doc.get("node"), doc.get("override")) == ("gpu-a", override)
    assert problems(doc, document.StatusDoc) == []
    board.apply(policy=Policy(node="gpu-b"))
    assert board.status().get("node") == "gpu-b" and "override" not in board.status()
