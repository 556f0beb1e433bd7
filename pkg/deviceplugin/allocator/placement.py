"""Which seats to offer the kubelet for a request (``GetPreferredAllocation``).

``spread`` puts a workload on the groups with the fewest held seats, so it shares its
GPUs with as few others as possible; ``pack`` fills the busiest groups first, keeping
whole groups free. Seats in a bad state come last (the kubelet may still list them as
available), several seats go to distinct groups where possible, close in topology.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pkg.deviceplugin.allocator.layout import Layout
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.views import GOOD_STATES, Snapshot
from pkg.deviceplugin.types import DeviceId, GroupName, PlacementPolicy, ResourceName, seat_number

Strategy = PlacementPolicy


@dataclass(frozen=True)
class Candidate:
    """The available seats of one group that are in one condition (good or not).

    Every ranking criterion but the seat number is the same for all of them, so
    placement ranks candidates, a few per group, rather than seats: its cost grows with
    the groups, not with the seats the kubelet offers.
    """

    group: GroupName
    good: bool
    held_in_group: int
    seats: tuple[DeviceId, ...]


def choose(
    candidates: Sequence[Candidate],
    must_include: Sequence[DeviceId],
    size: int,
    *,
    strategy: Strategy,
    closeness: Callable[[GroupName, GroupName], int],
) -> list[DeviceId]:
    """Pick ``size`` seats from ``candidates`` (the kubelet's available list), must-includes first.

    Never returns an ID outside ``candidates``. Each pick takes the lowest-numbered seat
    of the best candidate: good before bad, a group not chosen yet, then by held seats
    (fewest for ``spread``, most for ``pack``), closeness to the groups chosen, name.
    """
    pools = [list(c.seats) for c in candidates]
    chosen: list[DeviceId] = []
    groups_chosen: set[GroupName] = set()
    extra_held: dict[GroupName, int] = {}

    def take(i: int, device_id: DeviceId) -> None:
        pools[i].remove(device_id)
        chosen.append(device_id)
        group = candidates[i].group
        groups_chosen.add(group)
        extra_held[group] = extra_held.get(group, 0) + 1

    if must_include:
        owner = {device_id: i for i, pool in enumerate(pools) for device_id in pool}
        for device_id in dict.fromkeys(must_include):
            i = owner.get(device_id)
            if i is not None and len(chosen) < size:
                take(i, device_id)
    sign = 1 if strategy == "spread" else -1

    def key(i: int) -> tuple[bool, bool, int, int, str]:
        c = candidates[i]
        near = max((closeness(c.group, g) for g in groups_chosen), default=0)
        return (
            not c.good,
            c.group in groups_chosen,
            sign * (c.held_in_group + extra_held.get(c.group, 0)),
            -near,
            c.group,
        )

    live = [i for i, pool in enumerate(pools) if pool]
    while len(chosen) < size and live:
        best = min(live, key=key)
        take(best, min(pools[best], key=seat_number))
        if not pools[best]:
            live.remove(best)
    return chosen


def prefer(
    snapshot: Snapshot,
    resource: ResourceName,
    available: Sequence[DeviceId],
    must_include: Sequence[DeviceId],
    size: int,
    policy: Policy,
    closeness: Callable[[GroupName, GroupName], int],
) -> list[DeviceId]:
    """:func:`choose` over the seats of ``available`` the snapshot shows for this
    profile. The seats of one group in one condition rank alike but for their number:
    they make one candidate."""
    views = snapshot.seats.get(resource, {})
    pools: dict[tuple[GroupName, bool], list[DeviceId]] = {}
    for device_id in dict.fromkeys(available):
        view = views.get(device_id)
        if view is not None:
            pools.setdefault((view.group, view.state in GOOD_STATES), []).append(device_id)
    held = snapshot.held_per_group
    candidates = [
        Candidate(group, good, held.get((resource, group), 0), tuple(seats))
        for (group, good), seats in pools.items()
    ]
    return choose(candidates, must_include, size, strategy=policy.placement, closeness=closeness)


class Closeness:
    """Group-to-group link quality, the worst link between their GPUs (0 for groups of
    the same GPUs, or one the layout lacks), memoised per layout: placement asks it per
    seat."""

    def __init__(self) -> None:
        self._layout: Layout | None = None
        self._known: dict[tuple[ResourceName, GroupName, GroupName], int] = {}

    def of(self, layout: Layout, resource: ResourceName) -> Callable[[GroupName, GroupName], int]:
        if self._layout is not layout:
            self._known = {}
            self._layout = layout
        known = self._known
        profile = layout.profiles.get(resource)
        groups = {g.name: g for g in profile.groups} if profile is not None else {}
        topology = layout.topology

        def closeness(a: GroupName, b: GroupName) -> int:
            score = known.get((resource, a, b))
            if score is None:
                ga, gb = groups.get(a), groups.get(b)
                score = known[(resource, a, b)] = (
                    0
                    if ga is None or gb is None or set(ga.indices) == set(gb.indices)
                    else min(
                        topology.link(x, y).score for x in ga.indices for y in gb.indices if x != y
                    )
                )
            return score

        return closeness
