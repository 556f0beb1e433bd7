"""``response.build`` called directly: what test_response.py (through the board) leaves out.

The CDI strategy, the whole annotation set, generations following the seat order,
device nodes by minor number, and both UVM nodes under the device root only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pkg.deviceplugin.allocator import response
from pkg.deviceplugin.allocator.tests.support import R1, R2, seed_layout
from pkg.deviceplugin.types import CudaVisibleDevices, DeviceId, ResourceName

LAYOUT = seed_layout()  # four GPUs in NVLink pairs, minor numbers 10..13


def bound(resource: ResourceName, *seats: tuple[str, int]) -> list[response.BoundSeat]:
    found = []
    for device_id, generation in seats:
        seat = LAYOUT.seat(resource, DeviceId(device_id))
        assert seat is not None, device_id
        found.append(response.BoundSeat(seat, generation))
    return found


def uuid(index: int) -> str:
    return f"GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd"


def test_every_fact_is_an_env_and_a_kyb_annotation_alike(tmp_path: Path) -> None:
    answer = response.build(R2, bound(R2, ("G23-s2", 7)), strategy="envvar", dev_root=tmp_path)
    facts = {
        "gpu-group": "G23",
        "gpu-seat": "G23-s2",
        "seat-gen": "7",
        "gpu-uuids": f"{uuid(2)},{uuid(3)}",
        "gpu-indices": "2,3",
        "resource": R2,
    }
    assert answer.annotations == {f"kyb.ai/{key}": value for key, value in facts.items()}
    assert answer.envs == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": facts["gpu-uuids"],
        "KYB_GPU_GROUP": "G23",
        "KYB_GPU_SEAT": "G23-s2",
        "KYB_SEAT_GEN": "7",
        "KYB_GPU_UUIDS": facts["gpu-uuids"],
        "KYB_GPU_INDICES": "2,3",
        "KYB_RESOURCE": R2,
    }


def test_generations_follow_their_seats_into_the_one_order(tmp_path: Path) -> None:
    # handed in out of order, with generations that would not sort the same way
    answer = response.build(
        R1,
        bound(R1, ("G3-s0", 2), ("G1-s3", 9), ("G1-s1", 4)),
        strategy="envvar",
        dev_root=tmp_path,
    )
    assert answer.envs["KYB_GPU_SEAT"] == "G1-s1,G1-s3,G3-s0"
    assert answer.envs["KYB_SEAT_GEN"] == "4,9,2"
    assert answer.envs["KYB_GPU_GROUP"] == "G1,G1,G3"
    assert answer.envs["KYB_GPU_INDICES"] == "1,3"


def test_device_nodes_are_named_by_minor_number_then_the_control_node(tmp_path: Path) -> None:
    answer = response.build(R2, bound(R2, ("G01-s0", 1)), strategy="envvar", dev_root=tmp_path)
    assert answer.device_paths == ("/dev/nvidia10", "/dev/nvidia11", "/dev/nvidiactl")
    assert answer.cdi_devices == ()


def test_both_uvm_nodes_come_after_the_control_node_when_the_device_root_has_them(
    tmp_path: Path,
) -> None:
    (tmp_path / "dev").mkdir()
    for name in ("nvidia-uvm-tools", "nvidia-uvm"):
        (tmp_path / "dev" / name).touch()
    answer = response.build(R1, bound(R1, ("G2-s0", 1)), strategy="envvar", dev_root=tmp_path)
    assert answer.device_paths == (
        "/dev/nvidia12",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
    )


def test_uvm_nodes_are_looked_for_under_the_device_root_not_on_the_host(tmp_path: Path) -> None:
    (tmp_path / "nvidia-uvm").touch()  # beside the root's dev/, not in it
    answer = response.build(R1, bound(R1, ("G0-s0", 1)), strategy="envvar", dev_root=tmp_path)
    assert answer.device_paths == ("/dev/nvidia10", "/dev/nvidiactl")


@pytest.mark.parametrize("form", ["ordinal", "index", "uuid"])
def test_the_cdi_strategy_names_each_gpu_once_by_uuid_and_no_device_node(
    tmp_path: Path, form: CudaVisibleDevices
) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia-uvm").touch()
    answer = response.build(
        R1,
        bound(R1, ("G3-s0", 1), ("G3-s2", 1), ("G0-s1", 3)),
        strategy="cdi",
        dev_root=tmp_path,
        cuda_visible_devices=form,
    )
    assert answer.cdi_devices == (f"nvidia.com/gpu={uuid(0)}", f"nvidia.com/gpu={uuid(3)}")
    assert answer.device_paths == ()
    # the envs do not depend on the strategy
    envvar = response.build(
        R1,
        bound(R1, ("G3-s0", 1), ("G3-s2", 1), ("G0-s1", 3)),
        strategy="envvar",
        dev_root=tmp_path,
        cuda_visible_devices=form,
    )
    assert answer.envs == envvar.envs and answer.annotations == envvar.annotations
