"""A held group never changes under its holder, whatever the config does (SPEC 4).

A model-based test: random Allocates, pod deletions, reconciles, restarts and config
changes (explicit groups redefined, renamed, swapped, dropped for auto grouping) against
the seat board, with the invariants checked after every step:
- a held seat keeps the group name and GPUs it was bound on until it is released;
- within a profile, group names are unique, groups share no GPU, no device ID is listed
  twice;
- the layout is always the one the config gives for the groups held right now (so once
  they are released, exactly the config's groups);
- what the board shows equals a full rebuild (no fence outlives its holder);
- no GPU is held by two profiles.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pkg.deviceplugin.allocator import layout, response, views
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import Holder
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
from pkg.deviceplugin.nvml import fixtures
from pkg.deviceplugin.nvml.topofile import load_topology_file
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName, Topology

TOPOLOGY = four_gpus_in_nvlink_pairs()
PROFILES = [layout.ProfileSpec(R1, 1, 2), layout.ProfileSpec(R2, 2, 2)]


def groups(*specs: tuple[str, tuple[int, ...]]) -> tuple[layout.GroupSpec, ...]:
    return tuple(layout.GroupSpec(GroupName(name), gpus) for name, gpus in specs)


CONFIGS: dict[str, tuple[layout.GroupSpec, ...]] = {
    "auto": (),
    "seed": groups(("G01", (0, 1)), ("G23", (2, 3))),
    "moved": groups(("G01", (0, 2)), ("G13", (1, 3))),
    # the name auto grouping gives GPUs 2, 3, on GPUs 0, 1
    "colliding": groups(("G23", (0, 1))),
    "swapped": groups(("G01", (2, 3)), ("G23", (0, 1))),
    "singles": groups(("A", (3,)), ("B", (2,)), ("C", (1,)), ("D", (0,))),
}


def plan_for(name: str) -> layout.Plan:
    def plan(pins: layout.Pins) -> layout.Layout:
        return layout.build(PROFILES, CONFIGS[name], TOPOLOGY, pins)

    return plan


def fixtures_topology(name: str) -> Topology:
    return load_topology_file(fixtures.resolve(name)).topology()


def seats_of(lay: layout.Layout, resource: ResourceName) -> list[str]:
    return [s.device_id for s in lay.seats(resource)]


class HeldGroupsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kyb-held-"))
        self.clock = Clock()
        self.config = "seed"
        self.writes = WritesBehind()
        self.board = self._open()
        # (resource, seat) -> (pod, group name, GPUs) as the pod received them
        self.held: dict[tuple[ResourceName, str], tuple[str, str, tuple[int, ...]]] = {}
        self.next_pod = 0

    def _open(self) -> SeatBoard:
        return SeatBoard(
            plan_for(self.config),
            Policy(),
            StateStore(self.dir),
            release_grace_s=60,
            clock=self.clock,
            monotonic=self.clock,
            write_behind=self.writes,
        )

    def _observed(self) -> dict[tuple[ResourceName, DeviceId], Holder]:
        return {
            (r, DeviceId(d)): Holder("ns", p, "main") for (r, d), (p, _, _) in self.held.items()
        }

    @rule(resource=st.sampled_from([R1, R2]), pick=st.integers(0, 31))
    def allocate(self, resource: ResourceName, pick: int) -> None:
        offered = seats_of(self.board.layout, resource)
        if not offered:
            return
        seat = offered[pick % len(offered)]
        try:
            [answer] = allocate(self.board, resource, [[seat]], self._observed())
        except AllocationError:
            return
        gpus = tuple(int(i) for i in answer.envs["KYB_GPU_INDICES"].split(","))
        known = self.held.get((resource, seat))
        if known is not None:
            # the same live binding: the same group and GPUs as its holder got before
            assert (answer.envs["KYB_GPU_GROUP"], gpus) == known[1:], (known, answer.envs)
            return
        self.held[(resource, seat)] = (f"p{self.next_pod}", answer.envs["KYB_GPU_GROUP"], gpus)
        self.next_pod += 1

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def delete_pod(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.held)))
        del self.held[key]

    @rule()
    def reconcile(self) -> None:
        self.board.reconcile(self._observed())

    @rule(config=st.sampled_from(sorted(CONFIGS)))
    def change_config(self, config: str) -> None:
        self.config = config
        self.board.apply(plan=plan_for(config))

    @rule()
    def state_file_written_behind(self) -> None:
        self.writes.land()

    @rule(clean=st.booleans())
    def restart(self, clean: bool) -> None:
        if clean:
            self.board.close()
            self.board.flush()
        self.writes.drop()  # the writes behind the journal die with the process
        self.board = self._open()

    @invariant()
    def a_held_seat_keeps_the_group_and_gpus_it_was_bound_on(self) -> None:
        bindings = dict(self.board._ledger.held())
        for (resource, seat), (_, group, gpus) in self.held.items():
            binding = bindings.get((resource, DeviceId(seat)))
            if binding is None:  # released on evidence: its pod is gone
                continue
            assert (binding.group, binding.gpus) == (group, gpus)
            shown = self.board.layout.seat(resource, DeviceId(seat))
            assert shown is not None, f"{seat} of {resource} vanished under its holder"
            assert (shown.group.name, shown.group.indices) == (group, gpus), (seat, shown)

    @invariant()
    def names_are_unique_and_groups_disjoint_within_a_profile(self) -> None:
        for resource, profile in self.board.layout.profiles.items():
            names = [g.name for g in profile.groups]
            assert len(set(names)) == len(names), (resource, names)
            members = [i for g in profile.groups for i in g.indices]
            assert len(set(members)) == len(members), (resource, profile.groups)
            ids = [d.device_id for d in self.board.devices(resource)]
            assert len(set(ids)) == len(ids), (resource, ids)

    @invariant()
    def the_layout_is_the_configs_for_the_groups_held_now(self) -> None:
        expected = plan_for(self.config)(self.board.held_groups())
        assert self.board.layout.profiles == expected.profiles
        if not self.board.held_groups():
            assert not self.board.layout.held_over
            assert self.board.layout.profiles == plan_for(self.config)({}).profiles

    @invariant()
    def what_is_shown_equals_a_full_rebuild(self) -> None:
        board = self.board
        with board._lock:
            shown = board._snapshot
            full = views.build(board._facts(), shown.version)
        assert shown.seats == full.seats
        assert shown.devices == full.devices

    @invariant()
    def no_gpu_is_held_by_two_profiles(self) -> None:
        holders: dict[int, set[str]] = {}
        for (resource, _), binding in self.board._ledger.held():
            for gpu in binding.gpus:
                holders.setdefault(gpu, set()).add(resource)
        assert all(len(r) == 1 for r in holders.values()), holders


HeldGroupsMachine.TestCase.settings = settings(
    max_examples=model_examples(80), stateful_step_count=30, deadline=None
)
TestHeldGroups = HeldGroupsMachine.TestCase


def held_board(config: str = "seed", clock: Clock | None = None) -> SeatBoard:
    clock = clock or Clock()
    return SeatBoard(
        plan_for(config), Policy(), None, release_grace_s=60, clock=clock, monotonic=clock
    )


def test_an_explicit_group_redefined_under_its_holder_stays_until_released() -> None:
    clock = Clock()
    board = held_board(clock=clock)
    [first] = allocate(board, R2, [["G01-s0"]])
    board.apply(plan=plan_for("moved"))
    [again] = allocate(board, R2, [["G01-s0"]])  # the hand-off to the app container
    assert again == first and again.envs["KYB_GPU_INDICES"] == "0,1"
    board.reconcile({(R2, DeviceId("G01-s0")): Holder("ns", "a", "main")})
    assert board.status()["resources"][R2]["groups"]["G01"]["gpus"] == [0, 1]
    board.reconcile({})  # the holder is missing from two answers two seconds apart: gone
    clock.now += 2
    board.reconcile({})
    assert board.status()["resources"][R2]["groups"]["G01"]["gpus"] == [0, 2]
    # no fence of the old G01 is left on the 1x seats of GPU 1 or 3
    assert {v.state for v in board.seat_views(R1).values()} == {"free"}


def test_a_held_groups_name_is_never_listed_twice() -> None:
    board = held_board()
    allocate(board, R2, [["G23-s1"]])
    board.apply(plan=plan_for("colliding"))  # G23 is now GPUs 0, 1 in the config
    ids = [d.device_id for d in board.devices(R2)]
    assert len(ids) == len(set(ids))
    [again] = allocate(board, R2, [["G23-s1"]])
    assert again.envs["KYB_GPU_INDICES"] == "2,3"
    assert board.status()["resources"][R2]["groups"]["G23"]["gpus"] == [2, 3]


def test_a_seat_bound_while_a_new_layout_is_decided_keeps_its_group() -> None:
    # Before, the runtime read the held groups, built the layout outside the board's
    # lock and applied it later: a seat bound in between was regrouped under its pod.
    board = held_board()
    deciding, go_on = threading.Event(), threading.Event()
    moved = plan_for("moved")

    def slow_plan(pins: layout.Pins) -> layout.Layout:
        deciding.set()
        go_on.wait(5)
        return moved(pins)

    applier = threading.Thread(target=board.apply, kwargs={"plan": slow_plan})
    applier.start()
    assert deciding.wait(5)
    answers: list[list[response.ContainerAllocation]] = []
    allocator = threading.Thread(target=lambda: answers.append(allocate(board, R2, [["G01-s0"]])))
    allocator.start()
    time.sleep(0.2)  # the Allocate is in flight while the layout is being decided
    go_on.set()
    applier.join(5)
    allocator.join(5)
    [[answer]] = answers
    seat = board.layout.seat(R2, DeviceId("G01-s0"))
    assert seat is not None
    assert answer.envs["KYB_GPU_INDICES"] == ",".join(map(str, seat.group.indices))


def test_group_names_stay_when_the_gpus_from_10_up_are_off_the_bus_at_a_restart() -> None:
    node = fixtures_topology("nvswitch-16")
    low = Topology(
        tuple(g for g in node.gpus if g.index < 10),
        {pair: link for pair, link in node.links.items() if max(pair) < 10},
    )
    specs = [layout.ProfileSpec(R1, 1, 1), layout.ProfileSpec(R2, 2, 1)]
    full = {(r, g.name): g.indices for r, g in layout.build(specs, (), node).groups()}
    degraded = {(r, g.name): g.indices for r, g in layout.build(specs, (), low).groups()}
    assert degraded and all(full.get(key) == members for key, members in degraded.items())
    assert (R2, "G01") in degraded and (R2, "G10-11") in full


def test_a_seat_adopted_after_a_lost_ledger_stays_on_its_held_over_group(tmp_path: Path) -> None:
    # Found by the process-level model (tests/e2e/test_model.py): the ledger is lost
    # while a group is held over; PodResources shows the seat held, and it used to be
    # adopted on the GPUs the config gives its group now (0, 2), not its pod's (0, 1).
    wall, mono = Clock(1_800_000_000.0), Clock()

    def opened(config: str) -> SeatBoard:
        return SeatBoard(
            plan_for(config),
            Policy(),
            StateStore(tmp_path, used_before="topology.json"),
            release_grace_s=60,
            clock=wall,
            monotonic=mono,
            write_behind=lambda write: write(),
        )

    board = opened("seed")
    (tmp_path / "topology.json").write_text("{}")
    allocate(board, R2, [["G01-s0"]])
    board.apply(plan=plan_for("moved"))  # G01 stays on GPUs 0, 1 for its holder
    (tmp_path / "state.json").unlink()
    after = opened("moved")
    held = {(R2, DeviceId("G01-s0")): Holder("ns", "a", "main")}
    after.reconcile(held)
    mono.now += 2
    after.reconcile(held)
    seat = after.layout.seat(R2, DeviceId("G01-s0"))
    assert seat is not None and seat.group.indices == (0, 1)
    views = after.seat_views(R1)
    assert views[DeviceId("G0-s0")].state == views[DeviceId("G1-s0")].state == "fenced"
    assert views[DeviceId("G2-s0")].state == "free"
