"""What a container gets: CUDA ordinals, PCI bus order, one order whatever the kubelet sends."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkg.deviceplugin.allocator import layout
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.tests.support import R1, R2, allocate
from pkg.deviceplugin.types import CudaVisibleDevices, Gpu, GroupName, Topology

# Four GPUs whose NVML indices are not in PCI bus order (a BIOS can enumerate so, and
# NVML's index order is not promised to be the bus order): CUDA_DEVICE_ORDER=PCI_BUS_ID
# inside the container numbers them by bus, so the lists must follow the bus too.
BUSES = {0: "00000000:C1:00.0", 1: "00000000:41:00.0", 2: "00000000:81:00.0", 3: "00000000:01:00.0"}
TOPOLOGY = Topology(
    tuple(
        Gpu(i, f"GPU-{i}{i}{i}", "NVIDIA H100 80GB HBM3", 81920, bus, minor=i, numa_node=0)
        for i, bus in BUSES.items()
    ),
    {},
)
BY_BUS = sorted(BUSES, key=lambda i: BUSES[i])  # [3, 1, 2, 0]


def board(policy: Policy | None = None) -> SeatBoard:
    lay = layout.build(
        [layout.ProfileSpec(R1, 1, 4), layout.ProfileSpec(R2, 2, 3)],
        [layout.GroupSpec(GroupName("G02"), (0, 2)), layout.GroupSpec(GroupName("G13"), (1, 3))],
        TOPOLOGY,
    )
    return SeatBoard(lay, policy or Policy(allow_overprovision=True), None, release_grace_s=60)


def test_a_group_not_starting_at_gpu_0_gets_cuda_ordinals_0_and_1() -> None:
    [answer] = allocate(board(), R2, [["G13-s0"]])
    assert answer.envs["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert answer.envs["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # GPU 3 sits on bus 01, GPU 1 on bus 41: CUDA ordinal 0 in the container is GPU 3.
    assert answer.envs["KYB_GPU_INDICES"] == "3,1"
    assert answer.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-333,GPU-111"
    assert answer.envs["KYB_GPU_UUIDS"] == "GPU-333,GPU-111"
    assert answer.annotations["kyb.ai/gpu-indices"] == "3,1"
    assert answer.annotations["kyb.ai/gpu-uuids"] == "GPU-333,GPU-111"
    # device nodes follow the same GPUs
    assert answer.device_paths[:2] == ("/dev/nvidia3", "/dev/nvidia1")


def test_two_seats_of_one_gpu_count_it_once() -> None:
    [answer] = allocate(board(), R1, [["G2-s1", "G2-s3"]])
    assert answer.envs["CUDA_VISIBLE_DEVICES"] == "0"
    assert answer.envs["KYB_GPU_INDICES"] == "2"
    assert answer.envs["KYB_GPU_SEAT"] == "G2-s1,G2-s3"
    assert answer.envs["KYB_GPU_GROUP"] == "G2,G2"


@pytest.mark.parametrize(
    ("form", "expected"),
    [("ordinal", "0,1"), ("index", "3,1"), ("uuid", "GPU-333,GPU-111")],
)
def test_cuda_visible_devices_form_is_the_operators_choice(
    form: CudaVisibleDevices, expected: str
) -> None:
    [answer] = allocate(
        board(Policy(allow_overprovision=True, cuda_visible_devices=form)), R2, [["G13-s2"]]
    )
    assert answer.envs["CUDA_VISIBLE_DEVICES"] == expected
    assert answer.envs["KYB_GPU_INDICES"] == "3,1"


SEATS_1X = [f"G{g}-s{k}" for g in range(4) for k in range(4)]


@settings(max_examples=60, deadline=None)
@given(
    picked=st.lists(st.sampled_from(SEATS_1X), min_size=1, max_size=6, unique=True),
    data=st.data(),
)
def test_every_list_is_in_one_order_whatever_order_the_kubelet_sends(
    picked: list[str], data: st.DataObject
) -> None:
    # The kubelet shuffles the IDs; the init container and the app container that reuses
    # its seats (a repeat of the same IDs in another order) must get identical answers.
    b = board()
    [first] = allocate(b, R1, [picked])
    [again] = allocate(b, R1, [data.draw(st.permutations(picked))])
    assert again == first
    seats = first.envs["KYB_GPU_SEAT"].split(",")
    indices = [int(i) for i in first.envs["KYB_GPU_INDICES"].split(",")]
    # GPUs once each, in PCI bus order; seats in the bus order of their group's GPU
    assert indices == [i for i in BY_BUS if any(s.startswith(f"G{i}-") for s in picked)]
    assert sorted(seats) == sorted(picked)
    assert [BY_BUS.index(int(s[1])) for s in seats] == sorted(
        BY_BUS.index(int(s[1])) for s in seats
    )
    assert first.envs["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, range(len(indices))))
    assert first.envs["KYB_GPU_GROUP"] == ",".join(s.split("-")[0] for s in seats)
    assert len(first.envs["KYB_SEAT_GEN"].split(",")) == len(seats)


def test_invalid_argument_messages_quote_a_few_ids_each_shortened_then_a_count() -> None:
    b = board()
    many = [f"nope-{i}" for i in range(100_000)]
    with pytest.raises(AllocationError) as unknown:
        allocate(b, R1, [many])
    assert unknown.value.code == "invalid"
    message = str(unknown.value)
    assert "nope-0, nope-1" in message and "and 99995 more" in message
    assert len(message) < 1000
    huge = "x" * 1_000_000
    with pytest.raises(AllocationError) as long_id:
        allocate(b, R1, [[huge]])
    assert len(str(long_id.value)) < 300
    assert "1000000 chars" in str(long_id.value)
    with pytest.raises(AllocationError) as repeated:
        allocate(b, R1, [["G0-s0"] * 50_000])
    assert "and 49994 more" in str(repeated.value) and len(str(repeated.value)) < 1000


def test_a_control_character_in_an_id_is_quoted_not_written_raw() -> None:
    with pytest.raises(AllocationError) as err:
        allocate(board(), R1, [["bad\nline"]])
    assert "\n" not in str(err.value) and "bad\\nline" in str(err.value)


def test_uvm_nodes_are_offered_only_where_they_exist(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia-uvm-tools").touch()
    b = SeatBoard(board().layout, Policy(allow_overprovision=True), None, release_grace_s=60)
    [answer] = allocate(b, R1, [["G0-s0"]], dev_root=tmp_path)
    assert answer.device_paths == ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm-tools")
