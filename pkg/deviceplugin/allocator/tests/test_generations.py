"""Seat generations never lie (SPEC 4, "Generations" and "Bindings end on evidence").

A model-based test drives the seat board as the kubelet would: pods admitted (with or
without an init container that hands its seats to the app container), deleted, short
pods gone before any ``List``, PodResources outages (Allocate without an observation),
a restarting kubelet's empty ``List``, plugin restarts, and wall-clock steps. After
every step:
- every new holder of a seat got a generation above every earlier holder of that seat,
  and the containers of one pod got the same one;
- a live pod's seats are held (and fence) whatever single ``List`` answer came;
- no GPU is held through two profiles' seats.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import GONE_CONFIRM_S, HANDOFF_S, Holder
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import (
    R1,
    R2,
    Clock,
    WritesBehind,
    allocate,
    model_examples,
    seed_layout,
)
from pkg.deviceplugin.types import DeviceId, ResourceName

SEATS = {
    R1: [DeviceId(f"G{g}-s{k}") for g in range(4) for k in range(4)],
    R2: [DeviceId(f"G{p}-s{k}") for p in ("01", "23") for k in range(3)],
}
# A pod lives longer than the hand-off window: only then may it never pass its
# generation on (a pod shorter than the window is the one case the kubelet's Allocate
# cannot tell from the hand-off).
POD_LIFETIME = HANDOFF_S + 0.5


class GenerationsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kyb-gen-"))
        self.mono = Clock(5_000.0)
        self.wall = Clock(1_800_000_000.0)
        self.writes = WritesBehind()
        self.board = self._open()
        (self.dir / "topology.json").write_text("{}")  # as the runtime writes after start
        self.adopt_pending: set[str] = set()
        self.awaiting_list = False
        self.pods: dict[str, tuple[ResourceName, tuple[DeviceId, ...]]] = {}
        self.generation_of: dict[str, dict[str, int]] = {}
        self.seen: set[str] = set()
        self.highest: dict[tuple[ResourceName, str], int] = {}
        self.outage = False
        self.next_pod = 0

    def _open(self) -> SeatBoard:
        return SeatBoard(
            seed_layout(),
            Policy(),
            StateStore(self.dir, used_before="topology.json"),
            release_grace_s=60,
            clock=self.wall,
            monotonic=self.mono,
            write_behind=self.writes,
        )

    def _observed(self) -> dict[tuple[ResourceName, DeviceId], Holder]:
        # List shows app containers only (plain init containers never appear there)
        return {
            (resource, seat): Holder("ns", pod, "app")
            for pod, (resource, seats) in self.pods.items()
            for seat in seats
        }

    def _allocate(self, resource: ResourceName, seats: list[DeviceId]) -> dict[str, str]:
        observed = None
        if not self.outage and self.board.needs_observation(resource, [seats]):
            observed = self._observed()
        try:
            [answer] = allocate(self.board, resource, [seats], observed)
        finally:
            if observed is not None:
                self._listed()
        return answer.envs

    def _listed(self) -> None:
        """PodResources answered: a ledger lost before is rebuilt from it (once it has
        answered twice, two seconds apart)."""
        self.awaiting_list = self.board._lost.awaiting
        for pod in self.adopt_pending & set(self.pods):
            resource, seats = self.pods[pod]
            views = self.board.seat_views(resource)
            for seat in seats:
                view = views[seat]
                assert view.state == "held", (pod, seat, view)
                # its binding survived (a damaged file loses only its damaged entries),
                # or it was adopted one generation above anything handed out
                assert view.generation == self.generation_of[pod][seat] or (
                    view.generation > self.highest[(resource, seat)]
                ), (pod, seat, view)
                self.highest[(resource, seat)] = max(
                    view.generation, self.highest[(resource, seat)]
                )
                self.generation_of[pod][seat] = view.generation
        self.adopt_pending = set()

    @rule(
        resource=st.sampled_from([R1, R2]),
        picks=st.lists(st.sampled_from([0, 1, 5, 10]), min_size=1, max_size=2, unique=True),
        with_init=st.booleans(),
    )
    def admit(self, resource: ResourceName, picks: list[int], with_init: bool) -> None:
        taken = {s for r, seats in self.pods.values() if r == resource for s in seats}
        seats = sorted({SEATS[resource][k % len(SEATS[resource])] for k in picks} - taken)
        if not seats:
            return
        # the previous pods on these seats lived at least this long
        self.mono.now += POD_LIFETIME
        self.wall.now += POD_LIFETIME
        try:
            first = self._allocate(resource, seats)
        except AllocationError as exc:
            # fenced or drained; or the ledger was lost and PodResources is down
            assert exc.code == "precondition" or (
                exc.code == "unavailable" and self.awaiting_list
            ), exc
            return
        envs = [first]
        if with_init:  # the kubelet re-sends the same IDs for the app container at once
            envs.append(self._allocate(resource, list(reversed(seats))))
            assert envs[1] == envs[0], "the containers of one pod got different answers"
        generations = dict(
            zip(
                first["KYB_GPU_SEAT"].split(","),
                map(int, first["KYB_SEAT_GEN"].split(",")),
                strict=True,
            )
        )
        for seat, generation in generations.items():
            key = (resource, seat)
            assert generation > self.highest.get(key, 0), (
                f"{seat} of {resource}: new holder got generation {generation}, "
                f"an earlier holder had {self.highest.get(key)}"
            )
            self.highest[key] = generation
        pod = f"p{self.next_pod}"
        self.next_pod += 1
        self.pods[pod] = (resource, tuple(seats))
        self.generation_of[pod] = generations

    @precondition(lambda self: bool(self.pods))
    @rule(data=st.data())
    def delete_pod(self, data: st.DataObject) -> None:
        del self.pods[data.draw(st.sampled_from(sorted(self.pods)))]

    @rule()
    def reconcile(self) -> None:
        if not self.outage:
            self.board.reconcile(self._observed())
            self._listed()
            self.seen |= set(self.pods)

    @rule()
    def kubelet_restart_answers_one_empty_list(self) -> None:
        if self.outage:
            return
        self.board.reconcile({})
        # one empty answer proves nothing: a pod List has seen keeps its seats meanwhile
        # (after a lost ledger, no seat is handed out until List has answered again)
        for pod in self.seen & set(self.pods) if not self.awaiting_list else ():
            resource, seats = self.pods[pod]
            views = self.board.seat_views(resource)
            assert all(views[s].state == "held" for s in seats), (pod, seats)
        self.board.reconcile(self._observed())
        self.seen |= set(self.pods)

    @rule(down=st.booleans())
    def podresources_outage(self, down: bool) -> None:
        self.outage = down

    @rule(seconds=st.sampled_from([0.5, GONE_CONFIRM_S, 30.0, 61.0]))
    def time_passes(self, seconds: float) -> None:
        self.mono.now += seconds
        self.wall.now += seconds

    @rule(step=st.sampled_from([-3600.0, 3600.0]))
    def wall_clock_steps(self, step: float) -> None:
        self.wall.now += step

    @rule()
    def state_file_written_behind(self) -> None:
        self.writes.land()

    @rule()
    def plugin_restarts(self) -> None:
        # SIGKILL-like: nothing flushed beyond what every change already wrote (new
        # bindings perhaps only to the journal: the writes behind them die too)
        self.writes.drop()
        self.board = self._open()

    @rule(how=st.sampled_from(["deleted", "truncated", "other-version", "damaged-entry"]))
    def state_file_lost(self, how: str) -> None:
        self.writes.drop()
        path = self.dir / "state.json"
        if how == "damaged-entry":
            path.write_text(path.read_text().replace('"generation":', '"generation":-', 1))
        else:
            damage(path, how)
        self.wall.now += 1
        self.board = self._open()
        self.adopt_pending = set(self.pods)
        self.awaiting_list = True
        if not self.outage:  # the runtime asks PodResources at start, before serving
            self.board.reconcile(self._observed())
            self._listed()

    @invariant()
    def a_live_pods_seats_are_held(self) -> None:
        if self.outage or self.awaiting_list:
            return  # without List a pod never seen may outlive its grace: that is its rule
        for pod, (resource, seats) in self.pods.items():
            views = self.board.seat_views(resource)
            for seat in seats:
                view = views[seat]
                assert view.state == "held", (pod, seat, view)
                # its binding is the one it was given: same generation, not a new one
                assert view.generation == self.generation_of[pod][seat], (pod, seat, view)

    @invariant()
    def no_gpu_is_held_through_two_profiles(self) -> None:
        holders: dict[int, set[str]] = {}
        for (resource, _), binding in self.board._ledger.held():
            for gpu in binding.gpus:
                holders.setdefault(gpu, set()).add(resource)
        assert all(len(r) == 1 for r in holders.values()), holders


GenerationsMachine.TestCase.settings = settings(
    max_examples=model_examples(100), stateful_step_count=40, deadline=None
)
TestGenerations = GenerationsMachine.TestCase


def board_with(clock: Clock, wall: Clock | None = None, **kwargs: float) -> SeatBoard:
    return SeatBoard(
        seed_layout(),
        Policy(),
        None,
        release_grace_s=kwargs.pop("grace", 60.0),
        handoff_s=kwargs.pop("handoff", HANDOFF_S),
        clock=wall or clock,
        monotonic=clock,
    )


def gen(board: SeatBoard, resource: ResourceName, seat: str) -> int:
    return int(allocate(board, resource, [[seat]])[0].envs["KYB_SEAT_GEN"])


def test_short_pods_never_pass_their_generation_on() -> None:
    # Pods a, b, c each admitted, run 3 s and deleted before any List saw them:
    # before, all three got generation 1.
    clock = Clock()
    board = board_with(clock)
    generations = []
    for _ in range(3):
        generations.append(gen(board, R1, "G0-s0"))
        clock.now += 3.0
    assert generations == [1, 2, 3]


def test_the_init_to_app_hand_off_within_the_window_keeps_the_generation() -> None:
    clock = Clock()
    board = board_with(clock)
    assert gen(board, R1, "G0-s0") == 1
    clock.now += 0.05  # the kubelet admits the pod's containers back to back
    assert gen(board, R1, "G0-s0") == 1
    clock.now += HANDOFF_S + 0.01
    assert gen(board, R1, "G0-s0") == 2


def test_a_seen_holders_seat_repeated_is_a_new_holder_without_asking_podresources() -> None:
    clock = Clock()
    board = board_with(clock)
    assert gen(board, R2, "G01-s0") == 1
    board.reconcile({(R2, DeviceId("G01-s0")): Holder("ns", "a", "app")})
    # pod a is deleted, pod b gets the seat while PodResources is down: no observation
    assert not board.needs_observation(R2, [[DeviceId("G01-s0")]])
    assert gen(board, R2, "G01-s0") == 2
    board.reconcile({(R2, DeviceId("G01-s0")): Holder("ns", "b", "app")})
    assert board.seat_views(R2)[DeviceId("G01-s0")].generation == 2


def test_one_empty_list_releases_nothing_and_a_holder_that_reappears_keeps_its_binding() -> None:
    clock = Clock()
    board = board_with(clock)
    gen(board, R1, "G0-s0")
    a = {(R1, DeviceId("G0-s0")): Holder("ns", "a", "app")}
    board.reconcile(a)
    assert board.reconcile({})  # a kubelet restarting answers before its pods are back
    assert board.seat_views(R1)[DeviceId("G0-s0")].state == "held"
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "fenced"
    clock.now += GONE_CONFIRM_S / 2
    assert board.reconcile({})  # a second empty answer, but too soon after the first
    assert board.seat_views(R1)[DeviceId("G0-s0")].state == "held"
    board.reconcile(a)
    clock.now += 10
    assert not board.reconcile(a)
    assert board.seat_views(R1)[DeviceId("G0-s0")].state == "held"
    # even released after two empty answers, the holder showing up again gets it back
    board.reconcile({})
    clock.now += GONE_CONFIRM_S
    board.reconcile({})
    assert board.seat_views(R1)[DeviceId("G0-s0")].state == "free"
    board.reconcile(a)
    view = board.seat_views(R1)[DeviceId("G0-s0")]
    assert (view.state, view.generation) == ("held", 1)
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "fenced"


def test_a_wall_clock_step_neither_releases_early_nor_holds_late() -> None:
    mono, wall = Clock(), Clock()
    board = board_with(mono, wall, grace=60.0)
    gen(board, R1, "G0-s0")
    wall.now += 3600  # an NTP step forward: before, the unseen binding ended at once
    board.reconcile({})
    assert board.seat_views(R1)[DeviceId("G0-s0")].state == "held"
    wall.now -= 7200  # and back: the grace still ends on time
    mono.now += 61
    board.reconcile({})
    assert board.seat_views(R1)[DeviceId("G0-s0")].state == "free"


def opened(state_dir: Path, wall: Clock, mono: Clock) -> SeatBoard:
    """A board whose state file is written right behind each new binding's journal
    line, before its Allocate returns: a later restart sees both."""
    return SeatBoard(
        seed_layout(),
        Policy(),
        StateStore(state_dir, used_before="topology.json"),
        release_grace_s=60,
        clock=wall,
        monotonic=mono,
        write_behind=lambda write: write(),
    )


def stored_board(state_dir: Path, wall: Clock, mono: Clock) -> SeatBoard:
    board = opened(state_dir, wall, mono)
    # the runtime asks PodResources at start, and again soon while the ledger is rebuilt
    board.reconcile({})
    mono.now += GONE_CONFIRM_S
    board.reconcile({})
    return board


def damage(path: Path, how: str) -> None:
    doc = json.loads(path.read_text())
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    elif how == "other-version":
        path.write_text(json.dumps({**doc, "version": 2}))
    elif how == "damaged-entry":
        seats = doc["resources"][R1]["groups"]["G0"]["seats"]
        seats["G0-s0"]["generation"] = -5
        seats["G0-s0"]["binding"]["generation"] = "3"
        path.write_text(json.dumps(doc))


@pytest.mark.parametrize("how", ["deleted", "truncated", "other-version", "damaged-entry"])
def test_no_generation_repeats_after_the_state_file_is_lost(tmp_path: Path, how: str) -> None:
    # Before, the next generation after a lost file was 1 again (after 1, 2, 3).
    wall, mono = Clock(1_800_000_000.0), Clock()
    board = stored_board(tmp_path, wall, mono)
    (tmp_path / "topology.json").write_text("{}")  # what the runtime writes after it
    handed = []
    for _ in range(3):
        handed.append(gen(board, R1, "G0-s0"))
        wall.now += POD_LIFETIME
        mono.now += POD_LIFETIME
    assert handed == [1, 2, 3]
    damage(tmp_path / "state.json", how)
    wall.now += 1
    after = stored_board(tmp_path, wall, mono)
    first = gen(after, R1, "G0-s0")
    assert first > max(handed)
    # the floor is saved: a seat not bound since the loss jumps too, after a clean restart
    again = stored_board(tmp_path, wall, mono)
    assert gen(again, R1, "G1-s0") > max(handed)
    # a second loss never goes back below the first one's generations, even after the
    # wall clock stepped back an hour: the reservation next to the state file survived
    mono.now += POD_LIFETIME
    wall.now -= 3600
    (tmp_path / "state.json").unlink()
    assert gen(stored_board(tmp_path, wall, mono), R1, "G0-s0") > first


def test_a_lost_ledger_refuses_new_bindings_until_podresources_has_answered(
    tmp_path: Path,
) -> None:
    wall, mono = Clock(1_800_000_000.0), Clock()
    board = stored_board(tmp_path, wall, mono)
    gen(board, R1, "G0-s0")
    (tmp_path / "topology.json").write_text("{}")
    (tmp_path / "state.json").unlink()
    after = opened(tmp_path, wall, mono)
    # a 2x seat on GPUs 0, 1 while a pod holds the 1x seat of GPU 0: nobody knows yet
    assert after.needs_observation(R2, [[DeviceId("G01-s0")]])
    with pytest.raises(AllocationError) as refused:
        allocate(after, R2, [["G01-s0"]])
    assert refused.value.code == "unavailable"
    # PodResources shows the holder: adopted, it fences the 2x group; but one answer is
    # not enough (a restarting kubelet answers before its pods are back)
    held = {(R1, DeviceId("G0-s0")): Holder("ns", "a", "app")}
    with pytest.raises(AllocationError) as waiting:
        allocate(after, R2, [["G01-s0"]], held)
    assert waiting.value.code == "unavailable"
    # a restart meanwhile does not forget that the ledger is being rebuilt
    after = opened(tmp_path, wall, mono)
    with pytest.raises(AllocationError) as still:
        allocate(after, R2, [["G01-s0"]])
    assert still.value.code == "unavailable"
    after.reconcile(held)
    mono.now += GONE_CONFIRM_S
    with pytest.raises(AllocationError) as fenced:
        allocate(after, R2, [["G01-s0"]], held)
    assert fenced.value.code == "precondition"
    assert "awaitingList" not in json.loads((tmp_path / "state.json").read_text())
    view = after.seat_views(R1)[DeviceId("G0-s0")]
    assert view.state == "held" and view.generation > 1


def test_a_fresh_node_counts_generations_from_1(tmp_path: Path) -> None:
    board = stored_board(tmp_path, Clock(1_800_000_000.0), Clock())
    assert gen(board, R1, "G0-s0") == 1
    assert "generationFloor" not in json.loads((tmp_path / "state.json").read_text())


def test_a_slow_disk_under_the_init_containers_answer_keeps_the_hand_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The init container's binding is made durable before its answer leaves; the
    # kubelet sends the app container's Allocate right after that answer. An fsync
    # longer than the window (a busy disk) once made the app container a new holder.
    wall, mono = Clock(1_800_000_000.0), Clock()
    board = stored_board(tmp_path, wall, mono)
    slow = True

    def sync(real: Callable[[int], None]) -> Callable[[int], None]:
        def synced(fd: int) -> None:
            real(fd)
            if slow:
                mono.now += HANDOFF_S + 1.0

        return synced

    monkeypatch.setattr(os, "fsync", sync(os.fsync))
    monkeypatch.setattr(os, "fdatasync", sync(os.fdatasync))
    started = mono.now
    assert gen(board, R1, "G0-s0") == 1
    assert mono.now > started + HANDOFF_S  # the write took longer than the window
    slow = False
    mono.now += 0.05
    assert gen(board, R1, "G0-s0") == 1
    mono.now += HANDOFF_S + 0.01
    assert gen(board, R1, "G0-s0") == 2


def test_an_app_containers_allocate_waiting_on_a_save_keeps_the_hand_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app container's Allocate arrives within the window but waits for the board's
    # lock, held by a save (a holder seen in PodResources) on a slow disk: the window
    # closes when the request arrives, not when the save lets it in.
    wall, mono = Clock(1_800_000_000.0), CallerClock()
    board = stored_board(tmp_path, wall, mono)
    assert gen(board, R1, "G1-s0") == 1  # pod b
    assert gen(board, R1, "G0-s0") == 1  # pod a's init container
    saving, go = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if threading.current_thread().name == "reconcile":
            saving.set()
            go.wait(10)

    monkeypatch.setattr(os, "fsync", fsync)
    seen_b = {(R1, DeviceId("G1-s0")): Holder("ns", "b", "app")}
    reconcile = threading.Thread(target=board.reconcile, args=(seen_b,), name="reconcile")
    reconcile.start()
    assert saving.wait(10)
    answers: list[int] = []
    app = threading.Thread(target=lambda: answers.append(gen(board, R1, "G0-s0")), name="app")
    app.start()
    deadline = time.monotonic() + 2.0
    while "app" not in mono.callers and time.monotonic() < deadline:
        time.sleep(0.01)
    mono.now += HANDOFF_S + 1.0  # the save's fsync took longer than the window
    go.set()
    reconcile.join(10)
    app.join(10)
    assert answers == [1]


class CallerClock(Clock):
    """A monotonic clock that notes which threads read it."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: set[str] = set()

    def __call__(self) -> float:
        self.callers.add(threading.current_thread().name)
        return self.now
