"""The seat board: one shared, thread-safe view of every profile's seats.

It joins the layout (groups and seats), the ledger (generations and bindings), GPU
health, and the operator's policy (overprovisioning, drain, placement), and turns them
into what the servers need: the device list of each resource, Allocate answers,
preferred allocations, and the status document. Every change bumps a version and wakes
the ListAndWatch streams. No gRPC, no NVML here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pkg.deviceplugin.allocator import placement, response
from pkg.deviceplugin.allocator.layout import Group, Layout, Seat, seat_id
from pkg.deviceplugin.allocator.ledger import Holder, Ledger, SeatKey
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName

log = logging.getLogger(__name__)

SeatState = Literal["free", "held", "fenced", "drained", "unhealthy"]
GOOD_STATES: frozenset[str] = frozenset({"free", "held"})


class AllocationError(Exception):
    """A request the plugin refuses; ``code`` maps to a gRPC status."""

    def __init__(
        self, code: Literal["invalid", "precondition", "unavailable"], message: str
    ) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Policy:
    allow_overprovision: bool = False
    placement: placement.Strategy = "spread"
    drain: frozenset[GroupName] = frozenset()
    device_list_strategy: Literal["envvar", "cdi"] = "envvar"


@dataclass(frozen=True)
class DeviceView:
    """One seat as a ListAndWatch stream shows it."""

    device_id: DeviceId
    healthy: bool
    numa_nodes: tuple[int, ...]


@dataclass(frozen=True)
class SeatView:
    device_id: DeviceId
    state: SeatState
    generation: int
    group: GroupName
    why: str = ""


@dataclass
class _Snapshot:
    version: int
    seats: dict[ResourceName, dict[DeviceId, SeatView]] = field(default_factory=dict)
    devices: dict[ResourceName, list[DeviceView]] = field(default_factory=dict)
    held_per_group: dict[tuple[ResourceName, GroupName], int] = field(default_factory=dict)


class SeatBoard:
    def __init__(
        self,
        layout: Layout,
        policy: Policy,
        store: StateStore | None,
        *,
        release_grace_s: float,
        clock: Callable[[], float] = time.time,
        dev_root: Path = Path("/"),
    ) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._layout = layout
        self._policy = policy
        self._store = store
        self._clock = clock
        self._dev_root = dev_root
        self._ledger = Ledger(release_grace_s)
        self._unhealthy: dict[str, str] = {}
        self._closeness_cache: dict[tuple[ResourceName, GroupName, GroupName], int] = {}
        self._closeness_layout: Layout | None = None
        self._closed = False
        self._restore(store.load() if store is not None else None)
        self._snapshot = self._build_snapshot(1)
        self._save()

    # ---- reads -------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def version(self) -> int:
        return self._snapshot.version

    def devices(self, resource: ResourceName) -> list[DeviceView]:
        return list(self._snapshot.devices.get(resource, ()))

    def seat_views(self, resource: ResourceName) -> dict[DeviceId, SeatView]:
        return dict(self._snapshot.seats.get(resource, {}))

    def wait_for_change(self, since: int, timeout_s: float) -> int:
        """Block until the version differs from ``since`` (or timeout, or close)."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._snapshot.version != since or self._closed, timeout_s
            )
            return self._snapshot.version

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- allocation --------------------------------------------------------------

    def needs_observation(self, resource: ResourceName, requests: Sequence[Sequence[str]]) -> bool:
        """Whether an Allocate should first look at PodResources.

        A pure repeat of bindings never seen in PodResources is the init-to-app
        container hand-off of one pod: the ledger answers it alone. Anything else
        (a new binding, a seat whose known holder may be gone) asks the kubelet first.
        """
        with self._lock:
            for ids in requests:
                for device_id in ids:
                    binding = self._ledger.binding((resource, DeviceId(device_id)))
                    if binding is None or binding.holder is not None:
                        return True
            return False

    def allocate(
        self,
        resource: ResourceName,
        requests: Sequence[Sequence[str]],
        observed: Mapping[SeatKey, Holder] | None = None,
    ) -> list[response.ContainerAllocation]:
        """Bind the seats of every container request, all or nothing."""
        with self._lock:
            if observed is not None:
                self._reconcile_locked(observed)
            seats = self._validate(resource, requests)
            now = self._clock()
            new: list[tuple[Seat, int]] = []
            answers: list[list[response.BoundSeat]] = []
            for container_seats in seats:
                bound: list[response.BoundSeat] = []
                for seat in container_seats:
                    generation, is_new = self._ledger.bind(
                        (resource, seat.device_id), now, seat.group.name, seat.group.indices
                    )
                    if is_new:
                        new.append((seat, generation))
                    bound.append(response.BoundSeat(seat, generation))
                answers.append(bound)
            if new:
                self._snapshot = self._build_snapshot(self._snapshot.version + 1)
                try:
                    if self._store is not None:
                        self._store.save(self._document(with_ledger=True))
                except OSError as exc:
                    for seat, generation in new:
                        self._ledger.unbind((resource, seat.device_id), generation)
                    self._snapshot = self._build_snapshot(self._snapshot.version + 1)
                    raise AllocationError(
                        "unavailable", f"could not persist the seat ledger: {exc}"
                    ) from exc
                self._changed.notify_all()
                for seat, generation in new:
                    log.info(
                        "seat bound",
                        extra={
                            "resource": resource,
                            "group": seat.group.name,
                            "seat": seat.device_id,
                            "generation": generation,
                        },
                    )
        return [
            response.build(
                resource,
                bound,
                strategy=self._policy.device_list_strategy,
                dev_root=self._dev_root,
            )
            for bound in answers
        ]

    def _validate(
        self, resource: ResourceName, requests: Sequence[Sequence[str]]
    ) -> list[list[Seat]]:
        if resource not in self._layout.profiles:
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
                seat = self._layout.seat(resource, DeviceId(device_id))
                if seat is None:
                    unknown.append(device_id)
                else:
                    container.append(seat)
            result.append(container)
        if unknown:
            raise AllocationError(
                "invalid", f"unknown device ID(s) for {resource}: {', '.join(unknown)}"
            )
        if duplicates:
            raise AllocationError(
                "invalid", f"device ID(s) requested more than once: {', '.join(duplicates)}"
            )
        views = self._snapshot.seats[resource]
        refused = [
            f"{seat.device_id} is {view.state}{': ' + view.why if view.why else ''}"
            for container in result
            for seat in container
            if (view := views[seat.device_id]).state not in GOOD_STATES
        ]
        if refused:
            raise AllocationError("precondition", "; ".join(refused))
        return result

    def preferred(
        self,
        resource: ResourceName,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
    ) -> list[DeviceId]:
        snapshot = self._snapshot
        views = snapshot.seats.get(resource, {})
        candidates = [
            placement.Candidate(
                device_id=view.device_id,
                group=view.group,
                good=view.state in GOOD_STATES,
                held_in_group=snapshot.held_per_group.get((resource, view.group), 0),
            )
            for device_id in dict.fromkeys(available)
            if (view := views.get(DeviceId(device_id))) is not None
        ]
        return placement.choose(
            candidates,
            [DeviceId(d) for d in must_include],
            size,
            strategy=self._policy.placement,
            closeness=self._closeness(resource),
        )

    def _closeness(self, resource: ResourceName) -> Callable[[GroupName, GroupName], int]:
        """Group-to-group link quality, memoised per layout (placement asks it per seat)."""
        layout = self._layout
        if self._closeness_layout is not layout:
            self._closeness_cache = {}
            self._closeness_layout = layout
        cache = self._closeness_cache
        profile = layout.profiles.get(resource)
        groups = {g.name: g for g in profile.groups} if profile is not None else {}
        topology = layout.topology

        def closeness(a: GroupName, b: GroupName) -> int:
            key = (resource, a, b)
            known = cache.get(key)
            if known is None:
                known = cache[key] = _group_closeness(a, b)
            return known

        def _group_closeness(a: GroupName, b: GroupName) -> int:
            ga, gb = groups.get(a), groups.get(b)
            if ga is None or gb is None:
                return 0
            return (
                min(topology.link(x, y).score for x in ga.indices for y in gb.indices if x != y)
                if set(ga.indices) != set(gb.indices)
                else 0
            )

        return closeness

    # ---- evidence from the kubelet and the GPUs -------------------------------------

    def reconcile(self, observed: Mapping[SeatKey, Holder]) -> None:
        with self._lock:
            self._reconcile_locked(observed)

    def _reconcile_locked(self, observed: Mapping[SeatKey, Holder]) -> None:
        before = {key: b.holder for key, b in self._ledger.held()}
        releases = self._ledger.reconcile(observed, self._clock())
        for release in releases:
            resource, device_id = release.key
            log.info(
                "seat released: %s",
                release.why,
                extra={"resource": resource, "seat": device_id, "generation": release.generation},
            )
        after = {key: b.holder for key, b in self._ledger.held()}
        if releases or before != after:
            self._changed_locked()

    def set_unhealthy(self, unhealthy: Mapping[str, str]) -> None:
        """Replace the set of unhealthy GPUs (UUID -> reason)."""
        with self._lock:
            if dict(unhealthy) != self._unhealthy:
                self._unhealthy = dict(unhealthy)
                self._changed_locked()

    def apply(self, layout: Layout | None = None, policy: Policy | None = None) -> None:
        """Swap in a new layout and/or policy (config reload, topology refresh)."""
        with self._lock:
            if layout is not None:
                self._layout = layout
            if policy is not None:
                self._policy = policy
            self._changed_locked()

    def held_groups(self) -> dict[int, list[tuple[GroupName, tuple[int, ...]]]]:
        """Groups with live bindings, per group size: they must not be regrouped."""
        with self._lock:
            pinned: dict[int, dict[str, tuple[int, ...]]] = {}
            for _, binding in self._ledger.held():
                pinned.setdefault(len(binding.gpus), {})[binding.group] = binding.gpus
            return {
                size: [(GroupName(name), gpus) for name, gpus in groups.items()]
                for size, groups in pinned.items()
            }

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def flush(self) -> None:
        with self._lock:
            self._save()

    # ---- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The SPEC section 9 status document (the state file adds ledger detail)."""
        return self._document(with_ledger=False)

    def _document(self, *, with_ledger: bool) -> dict[str, Any]:
        snapshot = self._snapshot
        resources: dict[str, Any] = {}
        groups_by_name = {
            (resource, group.name): group for resource, group in self._layout.groups()
        }
        for resource, views in snapshot.seats.items():
            groups: dict[str, Any] = {}
            for view in views.values():
                group = groups_by_name.get((resource, view.group))
                entry = groups.get(view.group)
                if entry is None:
                    entry = groups[view.group] = self._group_entry(resource, view.group, group)
                seat: dict[str, Any] = {"state": view.state, "generation": view.generation}
                if view.why:
                    seat["why"] = view.why
                if with_ledger:
                    seat.update(self._ledger.to_entry((resource, view.device_id)))
                entry["seats"][view.device_id] = seat
            resources[resource] = {"groups": groups}
        doc: dict[str, Any] = {"resources": resources}
        if with_ledger:
            shown = {(r, d) for r, views in snapshot.seats.items() for d in views}
            retired: dict[str, dict[str, Any]] = {}
            for key in self._ledger.keys():  # noqa: SIM118 (a ledger, not a dict)
                if key not in shown:
                    retired.setdefault(key[0], {})[key[1]] = self._ledger.to_entry(key)
            doc["retired"] = retired
            doc["updatedAt"] = self._clock()
        return doc

    def _group_entry(
        self, resource: ResourceName, name: GroupName, group: Group | None
    ) -> dict[str, Any]:
        if group is None:
            gpus = next(
                (b.gpus for (r, _), b in self._ledger.held() if r == resource and b.group == name),
                (),
            )
            topology = self._layout.topology
            uuids = [topology.gpu(i).uuid for i in gpus if i in topology.indices]
            return {
                "gpus": list(gpus),
                "uuids": uuids,
                "health": "Unhealthy",
                "numaNodes": [],
                "fenced": False,
                "drained": False,
                "seats": {},
            }
        unhealthy = [u for u in group.uuids if u in self._unhealthy]
        return {
            "gpus": list(group.indices),
            "uuids": list(group.uuids),
            "health": "Unhealthy" if unhealthy else "Healthy",
            "numaNodes": list(group.numa_nodes),
            "fenced": bool(self._fenced_by(resource, group)),
            "drained": name in self._policy.drain,
            "seats": {},
        }

    # ---- internals ---------------------------------------------------------------

    def _changed_locked(self) -> None:
        self._snapshot = self._build_snapshot(self._snapshot.version + 1)
        self._save()
        self._changed.notify_all()

    def _fenced_by(self, resource: ResourceName, group: Group) -> list[str]:
        if self._policy.allow_overprovision:
            return []
        members = set(group.indices)
        holders: list[str] = []
        for (other, _), binding in self._ledger.held():
            if other != resource and members & set(binding.gpus):
                holders.append(
                    f"GPU {', '.join(map(str, sorted(members & set(binding.gpus))))}"
                    f" is held by group {binding.group} of {other}"
                )
        return sorted(set(holders))

    def _build_snapshot(self, version: int) -> _Snapshot:
        snap = _Snapshot(version)
        held_keys = {key for key, _ in self._ledger.held()}
        for resource, profile in self._layout.profiles.items():
            views: dict[DeviceId, SeatView] = {}
            devices: list[DeviceView] = []
            for group in profile.groups:
                sick = [
                    f"GPU {g.index} ({g.uuid}) {self._unhealthy[g.uuid]}"
                    for g in group.gpus
                    if g.uuid in self._unhealthy
                ]
                fenced = self._fenced_by(resource, group)
                drained = group.name in self._policy.drain
                held_count = 0
                for k in range(profile.spec.seats_per_group):
                    device_id = seat_id(group.name, k)
                    key = (resource, device_id)
                    held = key in held_keys
                    held_count += held
                    state: SeatState
                    why = ""
                    if sick:
                        state, why = "unhealthy", "; ".join(sick)
                    elif held:
                        state = "held"
                    elif fenced:
                        state, why = "fenced", "; ".join(fenced)
                    elif drained:
                        state, why = "drained", f"group {group.name} is draining"
                    else:
                        state = "free"
                    views[device_id] = SeatView(
                        device_id,
                        state,
                        self._ledger.record(key).generation,
                        group.name,
                        why,
                    )
                    devices.append(DeviceView(device_id, state in GOOD_STATES, group.numa_nodes))
                snap.held_per_group[(resource, group.name)] = held_count
            snap.seats[resource] = views
            snap.devices[resource] = devices
        for (resource, device_id), binding in self._ledger.held():
            views = snap.seats.setdefault(resource, {})
            if device_id in views:
                continue
            views[device_id] = SeatView(
                device_id,
                "unhealthy",
                binding.generation,
                GroupName(binding.group),
                "seat no longer in the config; kept until released",
            )
            snap.devices.setdefault(resource, []).append(DeviceView(device_id, False, ()))
        return snap

    def _restore(self, doc: Mapping[str, Any] | None) -> None:
        if doc is None:
            return
        for resource, body in (doc.get("resources") or {}).items():
            for group in (body.get("groups") or {}).values():
                for device_id, entry in (group.get("seats") or {}).items():
                    self._restore_entry(resource, device_id, entry)
        for resource, seats in (doc.get("retired") or {}).items():
            for device_id, entry in seats.items():
                self._restore_entry(resource, device_id, entry)

    def _restore_entry(self, resource: str, device_id: str, entry: Any) -> None:
        key = (ResourceName(resource), DeviceId(device_id))
        try:
            self._ledger.restore(key, entry)
        except (KeyError, TypeError, ValueError) as exc:
            log.error(
                "seat ledger entry %s/%s is damaged (%s); ignoring its binding",
                resource,
                device_id,
                exc,
            )
            generation = entry.get("generation") if isinstance(entry, Mapping) else None
            if isinstance(generation, int):
                self._ledger.restore(key, {"generation": generation})

    def _save(self) -> None:
        if self._store is None:
            return
        try:
            self._store.save(self._document(with_ledger=True))
        except OSError as exc:
            log.error("could not save the seat ledger to %s: %s", self._store.path, exc)
