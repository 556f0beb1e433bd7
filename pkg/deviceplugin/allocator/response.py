"""What a container gets for its seats: envs, annotations, device nodes, CDI names.

Plain data only; the server turns it into a ``ContainerAllocateResponse``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pkg.deviceplugin.allocator.layout import Seat
from pkg.deviceplugin.types import Gpu, ResourceName

ANNOTATION_PREFIX = "kyb.ai/"
CDI_KIND = "nvidia.com/gpu"
# Device nodes every CUDA container needs besides its GPUs; the UVM ones exist only once
# the nvidia-uvm module is loaded, so they are offered only where they exist.
CONTROL_DEVICE = "/dev/nvidiactl"
OPTIONAL_DEVICES = ("/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


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


def build(
    resource: ResourceName,
    bound: Sequence[BoundSeat],
    *,
    strategy: str,
    dev_root: Path,
) -> ContainerAllocation:
    """The facts for one container request, seats in the order the kubelet sent them."""
    gpus = _union_gpus(bound)
    facts = {
        "gpu-group": ",".join(b.seat.group.name for b in bound),
        "gpu-seat": ",".join(b.seat.device_id for b in bound),
        "seat-gen": ",".join(str(b.generation) for b in bound),
        "gpu-uuids": ",".join(g.uuid for g in gpus),
        "gpu-indices": ",".join(str(g.index) for g in gpus),
        "resource": resource,
    }
    envs = {
        "CUDA_VISIBLE_DEVICES": facts["gpu-indices"],
        "NVIDIA_VISIBLE_DEVICES": facts["gpu-uuids"],
        "KYB_GPU_GROUP": facts["gpu-group"],
        "KYB_GPU_SEAT": facts["gpu-seat"],
        "KYB_SEAT_GEN": facts["seat-gen"],
        "KYB_GPU_UUIDS": facts["gpu-uuids"],
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


def _union_gpus(bound: Sequence[BoundSeat]) -> list[Gpu]:
    seen: dict[int, Gpu] = {}
    for b in bound:
        for gpu in b.seat.group.gpus:
            seen.setdefault(gpu.index, gpu)
    return list(seen.values())


def _exists(dev_root: Path, absolute: str) -> bool:
    return (dev_root / absolute.lstrip("/")).exists()
