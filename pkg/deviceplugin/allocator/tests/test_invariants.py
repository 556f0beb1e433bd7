"""Random sequences of Allocate, pod deletion, reconcile, restart (clean or SIGKILL-like),
and config change against the seat board, checking the ledger's invariants each step."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pkg.deviceplugin.allocator import layout
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import Holder, SeatKey
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import (
    R1,
    R2,
    Clock,
    WritesBehind,
    allocate,
    four_gpus_in_nvlink_pairs,
    model_examples,
)
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName

TOPOLOGY = four_gpus_in_nvlink_pairs()
SEATS = {
    R1: [DeviceId(f"G{g}-s{k}") for g in range(4) for k in range(4)],
    R2: [DeviceId(f"G{p}-s{k}") for p in ("01", "23") for k in range(3)],
}


def build(seats_2x: int) -> layout.Layout:
    return layout.build(
        [layout.ProfileSpec(R1, 1, 4), layout.ProfileSpec(R2, 2, seats_2x)],
        [layout.GroupSpec(GroupName("G01"), (0, 1)), layout.GroupSpec(GroupName("G23"), (2, 3))],
        TOPOLOGY,
    )


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kyb-ledger-"))
        self.clock = Clock()
        self.seats_2x = 3
        self.overprovision = False
        self.ever_overprovisioned = False
        self.writes = WritesBehind()
        self.board = self._open()
        self.pods: dict[SeatKey, str] = {}  # (resource, seat) -> pod
        self.seen_generation: dict[SeatKey, int] = {}
        self.next_pod = 0

    def _open(self) -> SeatBoard:
        return SeatBoard(
            build(self.seats_2x),
            Policy(allow_overprovision=self.overprovision),
            StateStore(self.dir),
            release_grace_s=60,
            clock=self.clock,
            monotonic=self.clock,
            write_behind=self.writes,
        )

    def _observed(self) -> dict[SeatKey, Holder]:
        return {(r, d): Holder("ns", pod, "main") for (r, d), pod in self.pods.items()}

    @rule(resource=st.sampled_from([R1, R2]), k=st.integers(0, 15))
    def allocate(self, resource: ResourceName, k: int) -> None:
        seat = SEATS[resource][k % len(SEATS[resource])]
        pod = f"p{self.next_pod}"
        self.next_pod += 1
        try:
            [answer] = allocate(self.board, resource, [[seat]], self._observed())
        except AllocationError:
            return
        generation = int(answer.envs["KYB_SEAT_GEN"])
        key = (resource, seat)
        assert generation >= self.seen_generation.get(key, 0)
        self.seen_generation[key] = generation
        self.pods.setdefault(key, pod)

    @rule(data=st.data())
    def delete_pod(self, data: st.DataObject) -> None:
        if not self.pods:
            return
        key = data.draw(st.sampled_from(sorted(self.pods)))
        del self.pods[key]

    @rule()
    def reconcile(self) -> None:
        self.board.reconcile(self._observed())

    @rule(seconds=st.sampled_from([1.0, 30.0, 61.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def state_file_written_behind(self) -> None:
        self.writes.land()

    @rule(clean=st.booleans())
    def restart(self, clean: bool) -> None:
        if clean:
            self.board.close()
            self.board.flush()
        # SIGKILL-like: nothing flushed beyond what every change already wrote (new
        # bindings perhaps only to the journal: the writes behind them die too).
        self.writes.drop()
        self.board = self._open()

    @rule(seats_2x=st.integers(1, 3), overprovision=st.booleans())
    def change_config(self, seats_2x: int, overprovision: bool) -> None:
        self.seats_2x, self.overprovision = seats_2x, overprovision
        self.ever_overprovisioned |= overprovision
        self.board.apply(plan=build(seats_2x), policy=Policy(allow_overprovision=overprovision))

    @invariant()
    def generations_never_go_back(self) -> None:
        for resource in (R1, R2):
            for view in self.board.seat_views(resource).values():
                key = (resource, view.device_id)
                assert view.generation >= self.seen_generation.get(key, 0), key

    @invariant()
    def no_gpu_is_held_by_two_profiles_while_fencing(self) -> None:
        # A switch from overprovisioning may legitimately leave GPUs shared; only runs
        # that never allowed it must never show a shared GPU.
        if self.ever_overprovisioned:
            return
        holders: dict[int, set[str]] = {}
        for (resource, _), binding in self.board._ledger.held():
            for gpu in binding.gpus:
                holders.setdefault(gpu, set()).add(resource)
        assert all(len(r) == 1 for r in holders.values()), holders

    @invariant()
    def state_file_always_loads(self) -> None:
        doc = json.loads((self.dir / "state.json").read_text())
        assert doc["version"] == 1
        assert set(doc["resources"]) == {R1, R2}


LedgerMachine.TestCase.settings = settings(
    max_examples=model_examples(60), stateful_step_count=30, deadline=None
)
TestLedgerInvariants = LedgerMachine.TestCase


def test_fenced_allocations_never_produce_two_profiles_on_one_gpu() -> None:
    board = SeatBoard(build(3), Policy(), None, release_grace_s=60)
    allocate(board, R2, [["G01-s0"]])
    for seat in ("G0-s0", "G1-s3"):
        try:
            allocate(board, R1, [[seat]])
        except AllocationError as exc:
            assert exc.code == "precondition"
        else:
            raise AssertionError(f"{seat} was bound while G01 is held by the 2x profile")
    assert board.seat_views(R1)[DeviceId("G2-s0")].state == "free"
