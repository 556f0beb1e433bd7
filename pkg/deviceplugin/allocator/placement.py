"""Which seats to offer the kubelet for a request (``GetPreferredAllocation``).

``spread`` puts a workload on the groups with the fewest held seats, so it shares its
GPUs with as few others as possible; ``pack`` fills the busiest groups first, keeping
whole groups free. Seats in a bad state come last (the kubelet may still list them as
available), several seats go to distinct groups where possible, close in topology.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pkg.deviceplugin.types import DeviceId, GroupName

Strategy = Literal["spread", "pack"]


@dataclass(frozen=True)
class Candidate:
    device_id: DeviceId
    group: GroupName
    good: bool
    held_in_group: int


def choose(
    candidates: Sequence[Candidate],
    must_include: Sequence[DeviceId],
    size: int,
    *,
    strategy: Strategy,
    closeness: Callable[[GroupName, GroupName], int],
) -> list[DeviceId]:
    """Pick ``size`` seats from ``candidates`` (the kubelet's available list), must-includes first.

    Never returns an ID outside ``candidates``.
    """
    by_id = {c.device_id: c for c in candidates}
    chosen: list[Candidate] = []
    for device_id in dict.fromkeys(must_include):
        candidate = by_id.get(device_id)
        if candidate is not None and len(chosen) < size:
            chosen.append(candidate)
    taken = {c.device_id for c in chosen}
    extra_held: dict[GroupName, int] = {}
    for c in chosen:
        extra_held[c.group] = extra_held.get(c.group, 0) + 1
    remaining = [c for c in candidates if c.device_id not in taken]
    sign = 1 if strategy == "spread" else -1
    while len(chosen) < size and remaining:
        groups_chosen = {c.group for c in chosen}

        def key(
            c: Candidate, groups_chosen: set[GroupName] = groups_chosen
        ) -> tuple[bool, bool, int, int, str, int]:
            near = max((closeness(c.group, g) for g in groups_chosen), default=0)
            return (
                not c.good,
                c.group in groups_chosen,
                sign * (c.held_in_group + extra_held.get(c.group, 0)),
                -near,
                c.group,
                _seat_number(c.device_id),
            )

        best = min(remaining, key=key)
        remaining.remove(best)
        chosen.append(best)
        extra_held[best.group] = extra_held.get(best.group, 0) + 1
    return [c.device_id for c in chosen]


def _seat_number(device_id: str) -> int:
    _, _, k = device_id.rpartition("-s")
    return int(k) if k.isdigit() else 0
