"""What a container gets for its seats: envs, annotations, device nodes, CDI names.

Plain data only; the server turns it into a ``ContainerAllocateResponse``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pkg.deviceplugin.allocator.layout import Seat
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.types import CudaVisibleDevices, ResourceName

ANNOTATION_PREFIX = "kyb.ai/"
CDI_KIND = "nvidia.com/gpu"
# Device nodes every CUDA container needs besides its GPUs; the UVM ones exist only once
# the nvidia-uvm module is loaded, so they are offered only where they exist.
CONTROL_DEVICE = "/dev/nvidiactl"
OPTIONAL_DEVICES = ("/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


"""How ``CUDA_VISIBLE_DEVICES`` names the container's GPUs.

``ordinal``: ``0..n-1``. Under the NVIDIA container runtime and under CDI a container
sees only its own GPUs, numbered from 0 in PCI bus order, so a host index would select
no GPU there. ``index``: host indices, for containers that see every GPU of the node
(privileged containers, or a runtime that does not isolate GPUs). ``uuid``: the UUIDs,
which CUDA matches in both cases."""


@dataclass(frozen=True)
class BoundSeat:
    seat: Seat
    generation: int


@dataclass(frozen=True)
class ContainerAllocation:
    envs: dict[str, str]
    annotations: dict[str, str]
    device_paths: tuple[str, ...]
    cdi_devices: tuple[str, ...]


def build_all(
    resource: ResourceName,
    containers: Sequence[Sequence[BoundSeat]],
    policy: Policy,
    dev_root: Path,
) -> list[ContainerAllocation]:
    """The answer for each container of an Allocate, as the board bound its seats."""
    return [
        build(
            resource,
            bound,
            strategy=policy.device_list_strategy,
            dev_root=dev_root,
            cuda_visible_devices=policy.cuda_visible_devices,
        )
        for bound in containers
    ]


def build(
    resource: ResourceName,
    bound: Sequence[BoundSeat],
    *,
    strategy: str,
    dev_root: Path,
    cuda_visible_devices: CudaVisibleDevices = "ordinal",
) -> ContainerAllocation:
    """The facts for one container request.

    Every list is in one order that does not depend on the order of the kubelet's IDs
    (it shuffles them): the init container and the app container that reuses its seats
    get the same answer. GPUs are in PCI bus order, so that position i of
    ``NVIDIA_VISIBLE_DEVICES`` is CUDA ordinal i inside the container.
    """
    seats = sorted(bound, key=_seat_order)
    gpus = sorted(
        {g.index: g for b in seats for g in b.seat.group.gpus}.values(), key=lambda g: g.bus_order
    )
    facts = {
        "gpu-group": ",".join(b.seat.group.name for b in seats),
        "gpu-seat": ",".join(b.seat.device_id for b in seats),
        "seat-gen": ",".join(str(b.generation) for b in seats),
        "gpu-uuids": ",".join(g.uuid for g in gpus),
        "gpu-indices": ",".join(str(g.index) for g in gpus),
        "resource": resource,
    }
    visible = {
        "ordinal": ",".join(str(ordinal) for ordinal in range(len(gpus))),
        "index": facts["gpu-indices"],
        "uuid": facts["gpu-uuids"],
    }[cuda_visible_devices]
    envs = {
        "CUDA_VISIBLE_DEVICES": visible,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": facts["gpu-uuids"],
        "KYB_GPU_GROUP": facts["gpu-group"],
        "KYB_GPU_SEAT": facts["gpu-seat"],
        "KYB_SEAT_GEN": facts["seat-gen"],
        "KYB_GPU_UUIDS": facts["gpu-uuids"],
        "KYB_GPU_INDICES": facts["gpu-indices"],
        "KYB_RESOURCE": facts["resource"],
    }
    annotations = {ANNOTATION_PREFIX + key: value for key, value in facts.items()}
    if strategy == "cdi":
        cdi = tuple(f"{CDI_KIND}={g.uuid}" for g in gpus)
        return ContainerAllocation(envs, annotations, (), cdi)
    paths = [g.device_path for g in gpus]
    paths.append(CONTROL_DEVICE)
    paths.extend(p for p in OPTIONAL_DEVICES if _exists(dev_root, p))
    return ContainerAllocation(envs, annotations, tuple(paths), ())


def _seat_order(bound: BoundSeat) -> tuple[tuple[tuple[str, int], ...], str, int]:
    group = bound.seat.group
    return (tuple(sorted(g.bus_order for g in group.gpus)), group.name, bound.seat.k)


def _exists(dev_root: Path, absolute: str) -> bool:
    # asked on every Allocate (nvidia-uvm appears when CUDA first loads it): os.path, not
    # pathlib, whose path objects cost more than the stat
    return os.path.exists(os.path.join(dev_root, absolute.lstrip("/")))
