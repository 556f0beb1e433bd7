from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import Holder
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import (
    R1,
    R2,
    Clock,
    MakeBoard,
    WritesBehind,
    allocate,
    seed_layout,
)
from pkg.deviceplugin.types import DeviceId, GroupName

POD_A = Holder("default", "a", "main")


def test_seat_ids_are_group_dash_s_k_for_every_profile(make_board: MakeBoard) -> None:
    board = make_board()
    assert [d.device_id for d in board.devices(R2)] == [
        "G01-s0",
        "G01-s1",
        "G01-s2",
        "G23-s0",
        "G23-s1",
        "G23-s2",
    ]
    assert len(board.devices(R1)) == 16
    assert board.devices(R1)[0].device_id == "G0-s0"


def test_devices_carry_the_numa_nodes_of_their_gpus(make_board: MakeBoard) -> None:
    board = make_board()
    by_id = {d.device_id: d for d in board.devices(R2)}
    assert by_id[DeviceId("G01-s0")].numa_nodes == (0,)
    assert by_id[DeviceId("G23-s1")].numa_nodes == (1,)


def test_allocate_returns_envs_annotations_and_minor_device_nodes(
    make_board: MakeBoard, tmp_path: Path
) -> None:
    (tmp_path / "root" / "dev").mkdir(parents=True)
    (tmp_path / "root" / "dev" / "nvidia-uvm").touch()
    board = make_board()
    [answer] = allocate(board, R2, [["G23-s1"]], dev_root=tmp_path / "root")
    # Under the NVIDIA runtime the container sees GPUs 2 and 3 as its CUDA devices 0, 1.
    assert answer.envs == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": "GPU-00000002-aaaa-bbbb-cccc-dddddddddddd,"
        "GPU-00000003-aaaa-bbbb-cccc-dddddddddddd",
        "KYB_GPU_GROUP": "G23",
        "KYB_GPU_SEAT": "G23-s1",
        "KYB_SEAT_GEN": "1",
        "KYB_GPU_UUIDS": "GPU-00000002-aaaa-bbbb-cccc-dddddddddddd,"
        "GPU-00000003-aaaa-bbbb-cccc-dddddddddddd",
        "KYB_GPU_INDICES": "2,3",
        "KYB_RESOURCE": "kyb.ai/gpu-2x-seat",
    }
    assert answer.annotations["kyb.ai/gpu-indices"] == "2,3"
    assert answer.annotations["kyb.ai/gpu-group"] == "G23"
    assert answer.annotations["kyb.ai/gpu-seat"] == "G23-s1"
    assert answer.annotations["kyb.ai/seat-gen"] == "1"
    # Minor numbers (12, 13), not indices (2, 3); uvm only where it exists.
    assert answer.device_paths == (
        "/dev/nvidia12",
        "/dev/nvidia13",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
    )
    assert answer.cdi_devices == ()


def test_several_seats_list_their_facts_comma_separated_in_pci_bus_order(
    make_board: MakeBoard,
) -> None:
    board = make_board()
    [answer] = allocate(board, R1, [["G3-s0", "G1-s2"]])
    assert answer.envs["KYB_GPU_SEAT"] == "G1-s2,G3-s0"
    assert answer.envs["KYB_GPU_GROUP"] == "G1,G3"
    assert answer.envs["KYB_SEAT_GEN"] == "1,1"
    assert answer.envs["KYB_GPU_INDICES"] == "1,3"
    assert answer.envs["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_cdi_strategy_names_cdi_devices_instead_of_device_nodes(make_board: MakeBoard) -> None:
    board = make_board(Policy(device_list_strategy="cdi"))
    [answer] = allocate(board, R1, [["G2-s0"]])
    assert answer.device_paths == ()
    assert answer.cdi_devices == ("nvidia.com/gpu=GPU-00000002-aaaa-bbbb-cccc-dddddddddddd",)


def test_repeated_allocate_is_the_same_binding_with_the_same_generation(
    make_board: MakeBoard,
) -> None:
    board = make_board()
    first = allocate(board, R2, [["G01-s0"]])
    again = allocate(board, R2, [["G01-s0"]])
    assert first == again
    assert again[0].envs["KYB_SEAT_GEN"] == "1"


def test_seat_released_by_podresources_evidence_gets_a_higher_generation(
    make_board: MakeBoard, clock: Clock
) -> None:
    board = make_board()
    allocate(board, R2, [["G01-s0"]])
    board.reconcile({(R2, DeviceId("G01-s0")): POD_A})
    assert board.reconcile({})  # holder seen before, missing now: ask again soon
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "held"
    clock.now += 2
    assert not board.reconcile({})  # still missing two seconds later: gone
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "free"
    [answer] = allocate(board, R2, [["G01-s0"]])
    assert answer.envs["KYB_SEAT_GEN"] == "2"


def test_binding_never_seen_ends_only_after_the_grace_period(
    make_board: MakeBoard, clock: Clock
) -> None:
    board = make_board(grace=60.0)
    allocate(board, R2, [["G01-s0"]])
    clock.now += 59
    board.reconcile({})
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "held"
    clock.now += 2
    board.reconcile({})
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "free"


def test_unknown_and_duplicate_ids_are_invalid_and_bind_nothing(make_board: MakeBoard) -> None:
    board = make_board()
    with pytest.raises(AllocationError) as unknown:
        allocate(board, R2, [["G01-s0", "G99-s0"]])
    assert unknown.value.code == "invalid"
    assert "G99-s0" in str(unknown.value)
    with pytest.raises(AllocationError) as duplicate:
        allocate(board, R2, [["G01-s1"], ["G01-s1"]])
    assert duplicate.value.code == "invalid"
    assert "G01-s1" in str(duplicate.value)
    assert all(v.state == "free" for v in board.seat_views(R2).values())


def test_holding_a_seat_fences_the_other_profiles_groups_sharing_its_gpus(
    make_board: MakeBoard,
) -> None:
    board = make_board()
    allocate(board, R1, [["G0-s0"]])
    views = board.seat_views(R2)
    assert {views[DeviceId(f"G01-s{k}")].state for k in range(3)} == {"fenced"}
    assert views[DeviceId("G23-s0")].state == "free"
    healthy = {d.device_id: d.healthy for d in board.devices(R2)}
    assert healthy[DeviceId("G01-s0")] is False
    assert healthy[DeviceId("G23-s0")] is True
    # Same profile, same GPU: still shareable (that is what a seat is).
    assert board.seat_views(R1)[DeviceId("G0-s1")].state == "free"
    with pytest.raises(AllocationError) as refused:
        allocate(board, R2, [["G01-s0"]])
    assert refused.value.code == "precondition"
    assert "held by group G0 of kyb.ai/gpu-1x-seat" in str(refused.value)


def gone(board: SeatBoard, clock: Clock) -> None:
    """Two ``List`` answers two seconds apart that lack the seen holders: they are gone."""
    board.reconcile({})
    clock.now += 2
    board.reconcile({})


def test_release_of_the_holder_unfences(make_board: MakeBoard, clock: Clock) -> None:
    board = make_board()
    allocate(board, R1, [["G1-s3"]])
    board.reconcile({(R1, DeviceId("G1-s3")): POD_A})
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "fenced"
    gone(board, clock)
    assert board.seat_views(R2)[DeviceId("G01-s0")].state == "free"


def test_allow_overprovision_offers_every_seat(make_board: MakeBoard) -> None:
    board = make_board(Policy(allow_overprovision=True))
    allocate(board, R1, [["G0-s0"]])
    [answer] = allocate(board, R2, [["G01-s0"]])
    assert answer.envs["KYB_GPU_SEAT"] == "G01-s0"


def test_concurrent_allocates_across_profiles_never_double_book_a_gpu(
    make_board: MakeBoard,
) -> None:
    board = make_board()
    wins: list[str] = []
    refusals: list[str] = []
    barrier = threading.Barrier(16)

    def attempt(resource_and_id: tuple[str, str]) -> None:
        resource, device_id = resource_and_id
        barrier.wait()
        try:
            allocate(board, resource, [[device_id]])  # type: ignore[arg-type]
            wins.append(f"{resource}:{device_id}")
        except AllocationError as exc:
            assert exc.code == "precondition"
            refusals.append(device_id)

    jobs = [(R1, f"G0-s{k % 4}") for k in range(8)] + [(R2, f"G01-s{k % 3}") for k in range(8)]
    threads = [threading.Thread(target=attempt, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winning_profiles = {w.split(":")[0] for w in wins}
    assert len(winning_profiles) == 1
    assert len(wins) + len(refusals) == 16


def test_unhealthy_gpu_makes_every_group_containing_it_unhealthy_in_every_profile(
    make_board: MakeBoard,
) -> None:
    board = make_board()
    board.set_unhealthy({"GPU-00000001-aaaa-bbbb-cccc-dddddddddddd": "fell off the bus"})
    sick1 = {d.device_id for d in board.devices(R1) if not d.healthy}
    sick2 = {d.device_id for d in board.devices(R2) if not d.healthy}
    assert sick1 == {DeviceId(f"G1-s{k}") for k in range(4)}
    assert sick2 == {DeviceId(f"G01-s{k}") for k in range(3)}
    with pytest.raises(AllocationError) as refused:
        allocate(board, R2, [["G01-s0"]])
    assert "fell off the bus" in str(refused.value)
    board.set_unhealthy({})
    assert all(d.healthy for d in board.devices(R2))


def test_drained_group_takes_no_new_binding_but_keeps_held_seats(make_board: MakeBoard) -> None:
    board = make_board(Policy(allow_overprovision=True))
    allocate(board, R2, [["G23-s0"]])
    board.apply(policy=Policy(allow_overprovision=True, drain=frozenset({GroupName("G23")})))
    views = board.seat_views(R2)
    assert views[DeviceId("G23-s0")].state == "held"
    assert views[DeviceId("G23-s1")].state == "drained"
    with pytest.raises(AllocationError):
        allocate(board, R2, [["G23-s1"]])
    assert allocate(board, R2, [["G23-s0"]])[0].envs["KYB_SEAT_GEN"] == "1"


def test_generations_and_bindings_survive_a_restart(make_board: MakeBoard, clock: Clock) -> None:
    board = make_board()
    allocate(board, R2, [["G01-s0"]])
    board.reconcile({(R2, DeviceId("G01-s0")): POD_A})
    gone(board, clock)
    allocate(board, R2, [["G01-s0"]])
    allocate(board, R1, [["G2-s2"]])
    board.close()
    board.flush()  # a clean stop: generations go on counting
    restarted = make_board()
    assert restarted.seat_views(R2)[DeviceId("G01-s0")].generation == 2
    assert restarted.seat_views(R2)[DeviceId("G01-s0")].state == "held"
    assert restarted.seat_views(R1)[DeviceId("G2-s2")].state == "held"
    # a restored binding is past its hand-off window: its seat's next Allocate is a new
    # holder (a hand-off spanning a plugin restart gets a new generation, never an old one)
    assert allocate(restarted, R1, [["G2-s2"]])[0].envs["KYB_SEAT_GEN"] == "2"
    assert restarted.seat_views(R2)[DeviceId("G23-s0")].state == "fenced"


def test_state_file_is_the_status_shape_with_ledger_detail(
    make_board: MakeBoard, tmp_path: Path, writes: WritesBehind
) -> None:
    board = make_board()
    allocate(board, R2, [["G01-s2"]])
    writes.land()
    doc = json.loads((tmp_path / "state" / "state.json").read_text())
    assert doc["version"] == 1
    group = doc["resources"]["kyb.ai/gpu-2x-seat"]["groups"]["G01"]
    assert group["gpus"] == [0, 1]
    assert group["health"] == "Healthy"
    assert group["seats"]["G01-s2"]["state"] == "held"
    assert group["seats"]["G01-s2"]["generation"] == 1
    assert group["seats"]["G01-s0"] == {"state": "free", "generation": 0}


def test_seat_removed_from_the_layout_while_held_stays_unhealthy_until_released(
    make_board: MakeBoard, clock: Clock
) -> None:
    board = make_board()
    allocate(board, R2, [["G23-s2"]])
    smaller = seed_layout()
    from pkg.deviceplugin.allocator import layout

    fewer = layout.build(
        [layout.ProfileSpec(R1, 1, 4), layout.ProfileSpec(R2, 2, 2)],
        [layout.GroupSpec(GroupName("G01"), (0, 1)), layout.GroupSpec(GroupName("G23"), (2, 3))],
        smaller.topology,
    )
    board.apply(plan=fewer)
    ids = {d.device_id: d.healthy for d in board.devices(R2)}
    assert ids[DeviceId("G23-s2")] is False
    board.reconcile({(R2, DeviceId("G23-s2")): POD_A})
    gone(board, clock)
    assert DeviceId("G23-s2") not in {d.device_id for d in board.devices(R2)}


def test_list_can_change_only_with_a_binding_a_recent_release_or_a_lost_ledger(
    make_board: MakeBoard, clock: Clock, tmp_path: Path
) -> None:
    board = make_board(grace=60.0)
    assert not board.list_can_change()  # an idle node: nothing List could end or give back
    allocate(board, R1, [["G1-s3"]])
    assert board.list_can_change()  # never seen yet: List would note its holder
    board.reconcile({(R1, DeviceId("G1-s3")): POD_A})
    assert board.list_can_change()  # seen: List would tell when it is gone
    board.reconcile({})
    assert board.list_can_change()  # missing once: ask again
    clock.now += 2
    board.reconcile({})
    assert board.seat_views(R1)[DeviceId("G1-s3")].state == "free"
    assert board.list_can_change()  # just released: its holder may show up again
    clock.now += 59
    assert board.list_can_change()
    board.reconcile({(R1, DeviceId("G1-s3")): POD_A})  # and it does: same binding back
    assert board.seat_views(R1)[DeviceId("G1-s3")].state == "held"
    gone(board, clock)
    clock.now += 61
    assert not board.list_can_change()
    # a lost ledger asks until PodResources has answered twice, 2 s apart
    (tmp_path / "state" / "state.json").write_text("not json")
    (tmp_path / "state" / "topology.json").write_text("{}")
    lost = SeatBoard(
        seed_layout(),
        Policy(),
        StateStore(tmp_path / "state", used_before="topology.json"),
        release_grace_s=60,
        clock=clock,
        monotonic=clock,
    )
    assert lost.list_can_change()
    lost.reconcile({})
    clock.now += 2
    lost.reconcile({})
    assert not lost.list_can_change()
