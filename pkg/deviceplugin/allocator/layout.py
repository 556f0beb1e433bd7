"""The seat layout: which groups each profile has and which seats they carry.

A layout is derived, never stored: from the config (profiles, explicit groups) and a
topology snapshot. The ledger keeps what must survive (generations, bindings) keyed by
resource and device ID, so a layout can be rebuilt at any time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from pkg.deviceplugin.topology import grouping
from pkg.deviceplugin.types import DeviceId, Gpu, GroupName, ResourceName, Topology

MAX_DEVICE_ID_LENGTH = 63


class LayoutError(Exception):
    """The config does not fit the discovered GPUs; one readable line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class ProfileSpec:
    """What a profile asks for: its resource and seats per group (GPUs per group follow)."""

    resource: ResourceName
    size: int
    seats_per_group: int


@dataclass(frozen=True)
class GroupSpec:
    """An explicitly configured group, by GPU index."""

    name: GroupName
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class Group:
    name: GroupName
    gpus: tuple[Gpu, ...]

    # Derived once per group: the board reads them for every seat it shows.
    @cached_property
    def indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    @cached_property
    def uuids(self) -> tuple[str, ...]:
        return tuple(g.uuid for g in self.gpus)

    @cached_property
    def numa_nodes(self) -> tuple[int, ...]:
        return tuple(sorted({g.numa_node for g in self.gpus if g.numa_node is not None}))


def seat_id(group: GroupName, k: int) -> DeviceId:
    return DeviceId(f"{group}-s{k}")


@dataclass(frozen=True, slots=True)
class Seat:
    resource: ResourceName
    device_id: DeviceId
    group: Group
    k: int


@dataclass(frozen=True)
class ProfileLayout:
    spec: ProfileSpec
    groups: tuple[Group, ...]

    @property
    def resource(self) -> ResourceName:
        return self.spec.resource

    def seats(self) -> Iterable[Seat]:
        for group in self.groups:
            for k in range(self.spec.seats_per_group):
                yield Seat(self.spec.resource, seat_id(group.name, k), group, k)


@dataclass(frozen=True)
class Layout:
    """Every profile's groups and seats, with a lookup by (resource, device ID)."""

    profiles: Mapping[ResourceName, ProfileLayout]
    topology: Topology
    _seats: Mapping[tuple[ResourceName, DeviceId], Seat] = field(repr=False, compare=False)

    @classmethod
    def of(cls, profiles: Iterable[ProfileLayout], topology: Topology) -> Layout:
        by_resource = {p.resource: p for p in profiles}
        seats = {(s.resource, s.device_id): s for p in by_resource.values() for s in p.seats()}
        return cls(MappingProxyType(by_resource), topology, MappingProxyType(seats))

    def seat(self, resource: ResourceName, device_id: DeviceId) -> Seat | None:
        return self._seats.get((resource, device_id))

    def seats(self, resource: ResourceName) -> list[Seat]:
        profile = self.profiles.get(resource)
        return list(profile.seats()) if profile is not None else []

    def all_seats(self) -> Iterable[Seat]:
        return self._seats.values()

    def groups(self) -> Iterable[tuple[ResourceName, Group]]:
        for profile in self.profiles.values():
            for group in profile.groups:
                yield profile.resource, group


def build(
    profiles: Sequence[ProfileSpec],
    explicit_groups: Sequence[GroupSpec],
    topology: Topology,
    healthy: Iterable[int] | None = None,
    keep: Mapping[int, Sequence[tuple[GroupName, tuple[int, ...]]]] | None = None,
) -> Layout:
    """Form every profile's groups.

    Explicit groups replace auto grouping for their size. Auto groups partition the
    ``healthy`` GPUs (default: all). ``keep`` pins groups per size that must survive a
    regrouping unchanged (groups with held seats are never regrouped under a workload);
    auto grouping then partitions only the GPUs those pinned groups leave.
    """
    known = set(topology.indices)
    problems: list[str] = []
    explicit_by_size: dict[int, list[GroupSpec]] = {}
    for position, spec in enumerate(explicit_groups):
        unknown = [i for i in spec.gpus if i not in known]
        if unknown:
            problems.append(
                f"groups[{position}] ({spec.name}): unknown GPU index "
                f"{', '.join(map(str, unknown))} (this node has "
                f"{_describe_indices(topology.indices)})"
            )
        explicit_by_size.setdefault(len(spec.gpus), []).append(spec)
    if problems:
        raise LayoutError(problems)

    usable = sorted(set(topology.indices if healthy is None else healthy) & known)
    layouts: list[ProfileLayout] = []
    for profile in profiles:
        explicit = explicit_by_size.get(profile.size)
        if explicit is not None:
            groups = tuple(
                Group(spec.name, tuple(topology.gpu(i) for i in spec.gpus)) for spec in explicit
            )
        else:
            groups = _auto_groups(
                topology, profile.size, usable, (keep or {}).get(profile.size, ())
            )
        for group in groups:
            longest = seat_id(group.name, profile.seats_per_group - 1)
            if len(longest) > MAX_DEVICE_ID_LENGTH:
                problems.append(
                    f"{profile.resource}: device ID {longest!r} is longer than "
                    f"{MAX_DEVICE_ID_LENGTH} characters"
                )
        layouts.append(ProfileLayout(profile, groups))
    if problems:
        raise LayoutError(problems)
    return Layout.of(layouts, topology)


def _auto_groups(
    topology: Topology,
    size: int,
    usable: Sequence[int],
    pinned: Sequence[tuple[GroupName, tuple[int, ...]]],
) -> tuple[Group, ...]:
    pinned_gpus = {i for _, members in pinned for i in members}
    free = [i for i in usable if i not in pinned_gpus]
    formed = [
        (GroupName(grouping.group_name(m, topology.indices)), m)
        for m in grouping.partition(topology, size, free)
    ]
    present = set(topology.indices)
    kept = [(name, members) for name, members in pinned if set(members) <= present]
    every = sorted(kept + formed, key=lambda item: item[1])
    return tuple(Group(name, tuple(topology.gpu(i) for i in members)) for name, members in every)


def _describe_indices(indices: Sequence[int]) -> str:
    if not indices:
        return "no GPUs"
    return f"GPU indices {', '.join(map(str, indices))}"
