"""The operator's policy for a board's seats, as the config sets it."""

from __future__ import annotations

from dataclasses import dataclass

from pkg.deviceplugin.allocator.document import OverrideDoc
from pkg.deviceplugin.types import (
    CudaVisibleDevices,
    DeviceListStrategy,
    GroupName,
    PlacementPolicy,
)


@dataclass(frozen=True)
class Policy:
    allow_overprovision: bool = False
    placement: PlacementPolicy = "spread"
    drain: frozenset[GroupName] = frozenset()
    drain_gpus: frozenset[int | str] = frozenset()
    """GPUs by index or UUID: every group containing one takes no new seats."""
    device_list_strategy: DeviceListStrategy = "envvar"
    cuda_visible_devices: CudaVisibleDevices = "ordinal"
    node: str | None = None
    """The node this runs on, where known (status shows it)."""
    override: OverrideDoc | None = None
    """The config's override for that node, as written, where it has one."""
