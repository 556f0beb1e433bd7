"""The card's generator: config plus topology, rendered as plugin registrations.

"A generator reads the profile config, renders one plugin registration per
``kyb.ai/gpu-<1x,2x,4x>-seat`` resource with its own socket, and runs them all in one
process" (the design card). This module is that rendering, as pure functions: no I/O,
no gRPC, no NVML. ``plan`` and ``status`` show what it renders; the runtime runs it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import cast

from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.document import OverrideDoc
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.config.model import Config
from pkg.deviceplugin.types import (
    DeviceId,
    GroupName,
    ResourceName,
    Topology,
    group_size_of,
    socket_name_of,
)


@dataclass(frozen=True)
class Registration:
    """One plugin registration: a resource on its own socket, its groups and seats, and
    the policy its server answers by."""

    resource: ResourceName
    socket: str
    groups: tuple[layout_mod.Group, ...]
    seats: tuple[DeviceId, ...]
    policy: Policy


def render(
    config: Config, topology: Topology, pins: layout_mod.Pins | None = None
) -> list[Registration]:
    """Every registration ``config`` gives on ``topology`` (``pins``: groups held)."""
    layout = build_layout(config, topology, pins)
    policy = policy_of(config)
    return [
        Registration(
            profile.resource,
            socket_name_of(profile.resource),
            profile.groups,
            tuple(seat.device_id for seat in profile.seats()),
            policy,
        )
        for profile in layout.profiles.values()
    ]


def profile_specs(config: Config) -> list[layout_mod.ProfileSpec]:
    return [
        layout_mod.ProfileSpec(
            ResourceName(p.resource), group_size_of(p.resource), p.seats_per_group
        )
        for p in config.profiles
    ]


def group_specs(config: Config) -> list[layout_mod.GroupSpec]:
    return [
        layout_mod.GroupSpec(GroupName(g.name), tuple(g.gpus), g.seats_per_group)
        for g in config.groups
    ]


def policy_of(config: Config, node: str | None = None) -> Policy:
    """The policy ``config`` sets; ``node``: the node it runs on (its override, already
    applied to ``config`` by :meth:`Config.for_node`, is named in the status)."""
    override = config.nodes.get(node) if node is not None else None
    return Policy(
        allow_overprovision=config.allow_overprovision,
        placement=config.preferred_allocation_policy,
        drain=frozenset(GroupName(name) for name in config.drain),
        drain_gpus=frozenset(config.drain_gpus),
        device_list_strategy=config.device_list_strategy,
        cuda_visible_devices=config.cuda_visible_devices,
        node=node,
        override=None if override is None else cast("OverrideDoc", override.to_data()),
    )


def absent_drain_gpus(config: Config, topology: Topology) -> list[str]:
    """A line for each ``drainGpus`` entry naming no GPU of ``topology``. Not an error:
    a pool-wide list names GPUs of other nodes, and the GPU one drains is often the one
    that has fallen off the bus."""
    uuids = {gpu.uuid for gpu in topology.gpus}
    return [
        f"drainGpus[{position}]: no GPU {ref!r} on this node ({_describe(topology)}); "
        "nothing to drain for it here"
        for position, ref in enumerate(config.drain_gpus)
        if ref not in (uuids if isinstance(ref, str) else topology.indices)
    ]


def _describe(topology: Topology) -> str:
    if not topology.gpus:
        return "no GPUs"
    return f"GPU indices {', '.join(str(i) for i in topology.indices)}"


def build_layout(
    config: Config, topology: Topology, pins: layout_mod.Pins | None = None
) -> layout_mod.Layout:
    return layout_mod.build(profile_specs(config), group_specs(config), topology, pins)


def plan_of(config: Config, topology: Topology) -> layout_mod.Plan:
    """The layout ``config`` gives on ``topology``, for whatever groups are held."""
    return functools.partial(build_layout, config, topology)


def explicit_gpus(config: Config) -> set[int]:
    return {index for group in config.groups for index in group.gpus}
