"""The operator's policy for a board's seats, as the config sets it."""

from __future__ import annotations

from dataclasses import dataclass

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
    device_list_strategy: DeviceListStrategy = "envvar"
    cuda_visible_devices: CudaVisibleDevices = "ordinal"
