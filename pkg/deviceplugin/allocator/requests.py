"""An Allocate's requests checked before anything is bound, and the errors it gets.

An Allocate may name any number of IDs of any length; its error message (and the log
line quoting it) names the first few, each shortened, then a count, so that a hostile
request cannot turn the reply into one larger than gRPC's metadata limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pkg.deviceplugin.allocator.layout import Layout, Seat
from pkg.deviceplugin.allocator.store import printable
from pkg.deviceplugin.allocator.views import GOOD_STATES, SeatView
from pkg.deviceplugin.types import DeviceId, ResourceName

Requests = Sequence[Sequence[DeviceId]]
"""An Allocate's device IDs, per container request."""

QUOTED_ITEMS = 5
QUOTED_ID_CHARS = 64
QUOTED_REASON_CHARS = 300


class AllocationError(Exception):
    """A request the plugin refuses; ``code`` maps to a gRPC status."""

    def __init__(
        self, code: Literal["invalid", "precondition", "unavailable"], message: str
    ) -> None:
        super().__init__(message)
        self.code = code


def quote_some(items: Sequence[str], *, separator: str = ", ", width: int = QUOTED_ID_CHARS) -> str:
    """The first ``QUOTED_ITEMS`` of ``items``, each as :func:`store.printable` shows it
    in at most ``width`` characters, then how many more there are."""
    shown = [printable(item, width) for item in items[:QUOTED_ITEMS]]
    rest = len(items) - len(shown)
    return separator.join(shown) + (f"{separator}and {rest} more" if rest else "")


def validate(
    layout: Layout,
    views: Mapping[DeviceId, SeatView],
    resource: ResourceName,
    requests: Requests,
) -> list[list[Seat]]:
    """The seats each container request names, where every one is known, named once in
    the whole Allocate, and free or held (``views``: the resource's seats as shown);
    else :class:`AllocationError`."""
    if resource not in layout.profiles:
        raise AllocationError("invalid", f"this plugin does not serve {resource}")
    if not requests:
        raise AllocationError("invalid", "Allocate request has no container requests")
    unknown: list[str] = []
    duplicates: list[str] = []
    seen: set[str] = set()
    result: list[list[Seat]] = []
    for ids in requests:
        if not ids:
            raise AllocationError("invalid", "a container request names no device IDs")
        container: list[Seat] = []
        for device_id in ids:
            if device_id in seen:
                duplicates.append(device_id)
                continue
            seen.add(device_id)
            seat = layout.seat(resource, device_id)
            if seat is None:
                unknown.append(device_id)
            else:
                container.append(seat)
        result.append(container)
    if unknown:
        raise AllocationError(
            "invalid", f"unknown device ID(s) for {resource}: {quote_some(unknown)}"
        )
    if duplicates:
        raise AllocationError(
            "invalid", f"device ID(s) requested more than once: {quote_some(duplicates)}"
        )
    refused = [
        f"{seat.device_id} is {view.state}{': ' + view.why if view.why else ''}"
        for container in result
        for seat in container
        if (view := views[seat.device_id]).state not in GOOD_STATES
    ]
    if refused:
        raise AllocationError(
            "precondition", quote_some(refused, separator="; ", width=QUOTED_REASON_CHARS)
        )
    return result
