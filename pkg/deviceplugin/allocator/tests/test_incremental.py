"""A new binding updates the board's snapshot and the encoded state file in place (only
the groups it touches); after any sequence of operations both must equal a full rebuild."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pkg.deviceplugin.allocator import views
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.document import LedgerEntry
from pkg.deviceplugin.allocator.ledger import Holder, SeatKey
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import (
    R1,
    R2,
    R4,
    Clock,
    WritesBehind,
    allocate,
    four_gpus_in_nvlink_pairs,
    model_examples,
    three_profiles,
)
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName

TOPOLOGY = four_gpus_in_nvlink_pairs()
SEATS = {
    R1: [DeviceId(f"G{g}-s{k}") for g in range(4) for k in range(4)],
    R2: [DeviceId(f"G{p}-s{k}") for p in ("01", "23") for k in range(5)],
    R4: [DeviceId(f"G0123-s{k}") for k in range(2)],
}
GPU_UUIDS = [g.uuid for g in TOPOLOGY.gpus]


class FlakyStore(StateStore):
    """A state store whose next save or journal line can be made to fail, as a full
    disk would."""

    fail_next = False

    def write(self, payload: str) -> None:
        self._maybe_fail()
        super().write(payload)

    def append(self, seats: Sequence[tuple[str, str, LedgerEntry]]) -> None:
        self._maybe_fail()
        super().append(seats)

    def _maybe_fail(self) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, "No space left on device")


class IncrementalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = FlakyStore(Path(tempfile.mkdtemp(prefix="kyb-incremental-")))
        self.clock = Clock()
        self.seats_2x = 3
        self.writes = WritesBehind()
        self.board = SeatBoard(
            three_profiles(self.seats_2x),
            Policy(),
            self.store,
            release_grace_s=60,
            clock=self.clock,
            monotonic=self.clock,
            write_behind=self.writes,
        )
        self.held: dict[SeatKey, Holder] = {}
        self.promised: dict[SeatKey, int] = {}

    @rule(
        resource=st.sampled_from([R1, R2, R4]),
        picks=st.lists(
            st.lists(st.integers(0, 15), min_size=1, max_size=3), min_size=1, max_size=2
        ),
        observe=st.booleans(),
        fail=st.booleans(),
    )
    def allocate(
        self, resource: ResourceName, picks: list[list[int]], observe: bool, fail: bool
    ) -> None:
        ids = SEATS[resource]
        requests = [[ids[k % len(ids)] for k in container] for container in picks]
        self.store.fail_next = fail
        observed = dict(self.held) if observe else None
        with contextlib.suppress(AllocationError):
            for answer in allocate(self.board, resource, requests, observed):
                seats = answer.envs["KYB_GPU_SEAT"].split(",")
                generations = map(int, answer.envs["KYB_SEAT_GEN"].split(","))
                for seat, generation in zip(seats, generations, strict=True):
                    self.promised[(resource, DeviceId(seat))] = generation
        self.store.fail_next = False

    @rule(resource=st.sampled_from([R1, R2, R4]), k=st.integers(0, 15), seen=st.booleans())
    def kubelet_reports(self, resource: ResourceName, k: int, seen: bool) -> None:
        key = (resource, SEATS[resource][k % len(SEATS[resource])])
        if seen:
            self.held[key] = Holder("ns", f"pod-{k}", "main")
        else:
            self.held.pop(key, None)

    @rule()
    def reconcile(self) -> None:
        self.board.reconcile(self.held)

    @rule(fail=st.booleans())
    def state_file_written_behind(self, fail: bool) -> None:
        self.store.fail_next = fail
        self.writes.land()
        self.store.fail_next = False

    @rule(seconds=st.sampled_from([1.0, 61.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(bad=st.sets(st.integers(0, 3), max_size=2))
    def health(self, bad: set[int]) -> None:
        self.board.set_unhealthy({GPU_UUIDS[i]: "XID 79" for i in bad})

    @rule(
        seats_2x=st.integers(1, 3),
        seats_g01=st.none() | st.integers(1, 5),
        overprovision=st.booleans(),
        drain=st.sets(st.sampled_from(["G1", "G23", "G0123"])),
        drain_gpus=st.sets(st.sampled_from([0, 3, GPU_UUIDS[1]]), max_size=2),
    )
    def change_config(
        self,
        seats_2x: int,
        seats_g01: int | None,
        overprovision: bool,
        drain: set[str],
        drain_gpus: set[int | str],
    ) -> None:
        self.seats_2x = seats_2x
        policy = Policy(
            allow_overprovision=overprovision,
            drain=frozenset(GroupName(g) for g in drain),
            drain_gpus=frozenset(drain_gpus),
        )
        self.board.apply(plan=three_profiles(seats_2x, seats_g01), policy=policy)

    @invariant()
    def snapshot_equals_a_full_rebuild(self) -> None:
        snapshot = self.board._snapshot
        assert snapshot == views.build(self.board._facts(), snapshot.version)

    @invariant()
    def encoded_state_equals_encoding_it_all_again(self) -> None:
        board: Any = self.board
        kept = board._state_fields()
        board._encoder.forget_all()
        assert kept == board._state_fields()

    @invariant()
    def a_restart_now_restores_every_binding_an_allocate_answered(self) -> None:
        # Only what an Allocate answered was promised, and only until it ended: a binding
        # adopted (or re-adopted) from PodResources is held by the kubelet already, and
        # the next List adopts it again if a failed save lost it. What a restart loads:
        # the state file with the journal's lines (those not yet written behind).
        doc = StateStore(self.store.state_dir).load()
        assert doc is not None
        for (resource, seat), generation in list(self.promised.items()):
            view = self.board.seat_views(resource).get(seat)
            if view is None or view.state != "held" or view.generation != generation:
                del self.promised[(resource, seat)]
                continue
            saved = doc["resources"][resource]["groups"][view.group]["seats"][seat]
            binding = saved["binding"]
            assert binding is not None
            assert binding["generation"] == view.generation


IncrementalMachine.TestCase.settings = settings(
    max_examples=model_examples(80), stateful_step_count=30, deadline=None
)
TestIncrementalSnapshot = IncrementalMachine.TestCase


def test_a_new_binding_keeps_the_device_lists_it_does_not_change(tmp_path: Path) -> None:
    board = SeatBoard(three_profiles(3), Policy(), StateStore(tmp_path), release_grace_s=60)
    before = {r: board._snapshot.devices[r] for r in (R1, R2, R4)}
    allocate(board, R1, [["G0-s0"]])
    after = board._snapshot.devices
    # the seat stays healthy (free -> held): its own list is the same object
    assert after[R1] is before[R1]
    # G01 and G0123 are fenced now: those lists changed
    assert after[R2] is not before[R2] and after[R4] is not before[R4]
    assert not board.devices(R2)[0].healthy
    assert board.devices(R2)[3].healthy


def test_a_repeat_allocate_reaches_the_state_file_at_the_next_save(
    tmp_path: Path, clock: Clock
) -> None:
    writes = WritesBehind()
    board = SeatBoard(
        three_profiles(3),
        Policy(),
        StateStore(tmp_path),
        release_grace_s=60,
        clock=clock,
        monotonic=clock,
        write_behind=writes,
    )
    allocate(board, R1, [["G0-s0"]])
    clock.now += 5
    allocate(board, R1, [["G0-s0"]])  # no save: nothing new to promise
    allocate(board, R1, [["G2-s0"]])
    writes.land()
    doc = json.loads((tmp_path / "state.json").read_text())
    seat = doc["resources"][R1]["groups"]["G0"]["seats"][DeviceId("G0-s0")]
    assert seat["binding"]["allocatedAt"] == clock.now


@pytest.mark.parametrize(("overprovision", "wakes"), [(True, 0), (False, 1)])
def test_streams_are_woken_at_once_only_when_a_device_list_changes(
    tmp_path: Path, overprovision: bool, wakes: int
) -> None:
    board = SeatBoard(
        three_profiles(3),
        Policy(allow_overprovision=overprovision),
        StateStore(tmp_path),
        release_grace_s=60,
    )
    woken: list[int] = []
    changed: Any = board._changed
    notify = changed.notify_all

    def notify_all() -> None:
        woken.append(board.version)
        notify()

    changed.notify_all = notify_all
    version = board.version
    allocate(board, R1, [["G0-s0"]])  # free -> held: healthy either way; fences G01, G0123
    assert board.version == version + 1
    assert len(woken) == wakes
