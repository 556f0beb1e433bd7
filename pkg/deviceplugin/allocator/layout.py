"""The seat layout: which groups each profile has and which seats they carry.

A layout is derived, never stored: from the config (profiles, explicit groups) and a
topology snapshot. The ledger keeps what must survive (generations, bindings) keyed by
resource and device ID, so a layout can be rebuilt at any time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from pkg.deviceplugin.topology import grouping
from pkg.deviceplugin.types import DeviceId, Gpu, GroupName, ResourceName, Topology, seat_id

MAX_DEVICE_ID_LENGTH = 63


class LayoutError(Exception):
    """The config does not fit the discovered GPUs; one readable line per problem.

    Each problem starts with its key path in the config (``groups[0].gpus: ...``);
    :meth:`located` puts where that key came from (the file, or a flag) in front.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        """``problems``: (top-level config key, line starting with its key path)."""
        self.entries = list(problems)
        self.problems = [line for _, line in self.entries]
        super().__init__("\n".join(self.problems))

    def located(self, origin: Callable[[str], str]) -> list[str]:
        """The problem lines, each after the origin of its top-level key."""
        return [f"{origin(key)}: {line}" for key, line in self.entries]


Pins = Mapping[int, Sequence[tuple[GroupName, tuple[int, ...]]]]
"""Per group size, the groups with held seats: (name, GPU indices)."""


@dataclass(frozen=True)
class ProfileSpec:
    """What a profile asks for: its resource and seats per group (GPUs per group follow)."""

    resource: ResourceName
    size: int
    seats_per_group: int


@dataclass(frozen=True)
class GroupSpec:
    """An explicitly configured group, by GPU index; ``seats_per_group``: its own seat
    count in place of its profile's (None: the profile's)."""

    name: GroupName
    gpus: tuple[int, ...]
    seats_per_group: int | None = None


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


@dataclass(frozen=True, slots=True)
class Seat:
    resource: ResourceName
    device_id: DeviceId
    group: Group
    k: int


@dataclass(frozen=True)
class ProfileLayout:
    """A profile's groups; ``group_seats``: the groups whose seat count is their own,
    not the profile's ``seats_per_group``."""

    spec: ProfileSpec
    groups: tuple[Group, ...]
    group_seats: Mapping[GroupName, int] = field(default_factory=dict)

    @property
    def resource(self) -> ResourceName:
        return self.spec.resource

    def seats_of(self, group: GroupName) -> int:
        """How many seats ``group`` carries."""
        return self.group_seats.get(group, self.spec.seats_per_group)

    def seats(self) -> Iterable[Seat]:
        for group in self.groups:
            for k in range(self.seats_of(group.name)):
                yield Seat(self.spec.resource, seat_id(group.name, k), group, k)


@dataclass(frozen=True)
class Layout:
    """Every profile's groups and seats, with a lookup by (resource, device ID).

    ``held_over``: groups that stay only for their held seats (the config or the
    topology now asks for something else); empty in a layout that is exactly what the
    config asks for.
    """

    profiles: Mapping[ResourceName, ProfileLayout]
    topology: Topology
    _seats: Mapping[tuple[ResourceName, DeviceId], Seat] = field(repr=False, compare=False)
    held_over: tuple[tuple[ResourceName, Group], ...] = ()

    @classmethod
    def of(
        cls,
        profiles: Iterable[ProfileLayout],
        topology: Topology,
        held_over: Iterable[tuple[ResourceName, Group]] = (),
    ) -> Layout:
        by_resource = {p.resource: p for p in profiles}
        seats = {(s.resource, s.device_id): s for p in by_resource.values() for s in p.seats()}
        return cls(
            MappingProxyType(by_resource),
            topology,
            MappingProxyType(seats),
            tuple(held_over),
        )

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


Plan = Callable[[Pins], Layout]
"""The layout a config and a topology give, as a function of the groups held right now:
the seat board calls it under its lock, so the groups it pins are exactly the held ones."""


def fixed(layout: Layout) -> Plan:
    """A plan that always gives ``layout`` (tests, benchmarks: nothing to pin against)."""
    return lambda _pins: layout


def build(
    profiles: Sequence[ProfileSpec],
    explicit_groups: Sequence[GroupSpec],
    topology: Topology,
    pins: Pins | None = None,
) -> Layout:
    """Form every profile's groups.

    Explicit groups replace auto grouping for their size; auto groups partition every
    GPU of the topology. A group with held seats never changes under its holders
    (``pins``): where the config or the topology now asks for something else, the held
    group stays as it is (``held_over``), the groups the config asks for are formed
    only where they leave its GPUs and its name alone, and auto grouping partitions
    the GPUs the held groups leave. Once nothing is held over, the layout is exactly
    what the config asks for, whatever was held before.
    """
    known = set(topology.indices)
    problems: list[tuple[str, str]] = []
    explicit_by_size: dict[int, list[GroupSpec]] = {}
    for position, spec in enumerate(explicit_groups):
        unknown = [i for i in spec.gpus if i not in known]
        if unknown:
            problems.append(
                (
                    "groups",
                    f"groups[{position}].gpus: unknown GPU index "
                    f"{', '.join(map(str, unknown))} in group {spec.name} (this node has "
                    f"{_describe_indices(topology.indices)})",
                )
            )
        explicit_by_size.setdefault(len(spec.gpus), []).append(spec)
    if problems:
        raise LayoutError(problems)

    layouts: list[ProfileLayout] = []
    held_over: list[tuple[ResourceName, Group]] = []
    for position, profile in enumerate(profiles):
        pinned = {
            name: members
            for name, members in (pins or {}).get(profile.size, ())
            if set(members) <= known
        }
        explicit = explicit_by_size.get(profile.size)
        try:
            wanted = (
                [(spec.name, spec.gpus) for spec in explicit]
                if explicit is not None
                else _auto_groups(topology, profile.size, topology.indices)
            )
            configured = set(wanted)
            stale = [(n, m) for n, m in pinned.items() if (n, m) not in configured]
            if not stale:
                chosen = wanted
            else:
                taken = {i for members in pinned.values() for i in members}
                candidates = (
                    wanted
                    if explicit is not None
                    else _auto_groups(
                        topology, profile.size, [i for i in topology.indices if i not in taken]
                    )
                )
                formed = [(n, m) for n, m in candidates if n not in pinned and taken.isdisjoint(m)]
                chosen = sorted([*pinned.items(), *formed], key=lambda item: item[1])
                held_over.extend((profile.resource, _group(topology, n, m)) for n, m in stale)
        except _TooManyGpus as exc:
            problems.append(
                (
                    "profiles",
                    f"profiles[{position}] ({profile.resource}): auto grouping forms "
                    f"{profile.size}-GPU groups on at most {grouping.MAX_EXACT_GPUS} GPUs, "
                    f"this node has {exc.count}; list this size's groups under 'groups'",
                )
            )
            continue
        groups = tuple(_group(topology, name, members) for name, members in chosen)
        # A group's own seat count applies to the group the config defines, not to a
        # held-over one of the same name on other GPUs.
        own = {
            spec.name: spec.seats_per_group
            for spec in explicit or ()
            if spec.seats_per_group is not None and (spec.name, spec.gpus) in chosen
        }
        profile_layout = ProfileLayout(profile, groups, own)
        for group in groups:
            longest = seat_id(group.name, profile_layout.seats_of(group.name) - 1)
            if len(longest) > MAX_DEVICE_ID_LENGTH:
                problems.append(
                    (
                        "profiles",
                        f"profiles[{position}] ({profile.resource}): device ID {longest!r} "
                        f"is longer than {MAX_DEVICE_ID_LENGTH} characters",
                    )
                )
        layouts.append(profile_layout)
    if problems:
        raise LayoutError(problems)
    return Layout.of(layouts, topology, held_over)


class _TooManyGpus(Exception):
    def __init__(self, count: int) -> None:
        self.count = count


def _group(topology: Topology, name: GroupName, members: Sequence[int]) -> Group:
    return Group(name, tuple(topology.gpu(i) for i in members))


def _auto_groups(
    topology: Topology, size: int, gpus: Sequence[int]
) -> list[tuple[GroupName, tuple[int, ...]]]:
    if size > 1 and len(gpus) > grouping.MAX_EXACT_GPUS:
        raise _TooManyGpus(len(gpus))
    return [(grouping.group_name(m), m) for m in grouping.partition(topology, size, gpus)]


def _describe_indices(indices: Sequence[int]) -> str:
    if not indices:
        return "no GPUs"
    return f"GPU indices {', '.join(map(str, indices))}"
