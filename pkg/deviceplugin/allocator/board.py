"""The seat board: one shared, thread-safe view of every profile's seats.

It joins the layout (groups and seats), the ledger (generations and bindings), GPU
health, and the operator's policy (overprovisioning, drain, placement), and turns them
into what the servers need: the device list of each resource, Allocate answers,
preferred allocations, and the status document. Every change bumps a version; one that
changes a device list also wakes the ListAndWatch streams at once (the others they
notice at their next poll, and send nothing). No gRPC, no NVML here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator import placement, response
from pkg.deviceplugin.allocator.layout import Group, Layout, Pins, Plan, Seat
from pkg.deviceplugin.allocator.ledger import (
    GONE_CONFIRM_S,
    HANDOFF_S,
    Bound,
    Holder,
    Ledger,
    SeatKey,
    floor_after_loss,
)
from pkg.deviceplugin.allocator.store import (
    MAX_GENERATION,
    StateStore,
    encode,
    encode_object,
    printable,
)
from pkg.deviceplugin.types import (
    CudaVisibleDevices,
    DeviceId,
    DeviceListStrategy,
    GroupName,
    ResourceName,
    SetAsideGpu,
    Topology,
    seat_id,
)

log = logging.getLogger(__name__)

_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kyb-state-writer")
"""Writes the state file behind the journal, for every board of the process."""
WRITE_BEHIND_S = 0.02
"""How long the state file's write waits behind a new binding's journal line for more
to come: a burst of bindings is saved once, and no save's fsync is in flight while the
next Allocate waits for its line's ``fdatasync`` (that costs it about 0.5 ms here)."""


def _write_later(write: Callable[[], None]) -> None:
    def delayed() -> None:
        time.sleep(WRITE_BEHIND_S)
        write()

    _WRITER.submit(delayed)


def settle() -> None:
    """Wait until every state file write queued behind journal lines so far has landed
    (or found its board closed): then the files are what a restart would load."""
    _WRITER.submit(lambda: None).result()


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
    device_list_strategy: DeviceListStrategy = "envvar"
    cuda_visible_devices: CudaVisibleDevices = "ordinal"


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One seat as a ListAndWatch stream shows it."""

    device_id: DeviceId
    healthy: bool
    numa_nodes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SeatView:
    device_id: DeviceId
    state: SeatState
    generation: int
    group: GroupName
    why: str = ""


GroupKey = tuple[ResourceName, GroupName]

RESERVE_AHEAD = 1000
"""How far the generation reservation runs ahead of the highest generation handed out:
one durable write per this many, and how far generations jump after a crash."""

# An Allocate may name any number of IDs of any length; its error message (and the log
# line quoting it) names the first few, each shortened, then a count, so that a hostile
# request cannot turn the reply into one larger than gRPC's metadata limit.
QUOTED_ITEMS = 5
QUOTED_ID_CHARS = 64
QUOTED_REASON_CHARS = 300


def quote_some(items: Sequence[str], *, separator: str = ", ", width: int = QUOTED_ID_CHARS) -> str:
    """The first ``QUOTED_ITEMS`` of ``items``, each as :func:`store.printable` shows it
    in at most ``width`` characters, then how many more there are."""
    shown = [printable(item, width) for item in items[:QUOTED_ITEMS]]
    rest = len(items) - len(shown)
    return separator.join(shown) + (f"{separator}and {rest} more" if rest else "")


@dataclass(frozen=True)
class _Snapshot:
    """What readers see without the lock. Never changed once published: an update
    copies the dicts and lists it changes, so a reader never sees half of one.

    ``groups`` holds each group's seats in order (the layout's seats, then those of
    live bindings the layout no longer has); ``seats`` is the same views by device ID.
    """

    version: int
    groups: dict[ResourceName, dict[GroupName, tuple[SeatView, ...]]] = field(default_factory=dict)
    seats: dict[ResourceName, dict[DeviceId, SeatView]] = field(default_factory=dict)
    devices: dict[ResourceName, list[DeviceView]] = field(default_factory=dict)
    held_per_group: dict[GroupKey, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Place:
    """A layout group and where its seats sit in its profile's device list."""

    group: Group
    offset: int
    seats: int


class SeatBoard:
    """``plan`` gives the layout for the groups held at the moment; the board asks it
    under its lock (at start, on :meth:`apply`, and when the last seat of a group held
    over from an earlier config or topology is released), so a layout never moves a
    group under a seat bound while it was being decided."""

    def __init__(
        self,
        plan: Plan | Layout,
        policy: Policy,
        store: StateStore | None,
        *,
        release_grace_s: float,
        handoff_s: float = HANDOFF_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        dev_root: Path = Path("/"),
        write_behind: Callable[[Callable[[], None]], object] = _write_later,
    ) -> None:
        """``clock``: wall time, only for what the state file shows people;
        ``monotonic``: every time the ledger's rules measure; ``write_behind``: runs
        the state file's write behind new bindings' journal lines, later."""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._plan = _as_plan(plan)
        self._policy = policy
        self._store = store
        self._clock = clock
        self._monotonic = monotonic
        self._dev_root = dev_root
        self._ledger = Ledger(release_grace_s, handoff_s)
        self._gone_pending = False
        self._released_at: float | None = None
        """Monotonic time of the last release (see :meth:`list_can_change`)."""
        self._unhealthy: dict[str, str] = {}
        self._closeness_cache: dict[tuple[ResourceName, GroupName, GroupName], int] = {}
        self._closeness_layout: Layout | None = None
        # The state file's groups (and retired seats) as last encoded; whatever changes
        # a group drops its entry, so a save encodes only the groups that changed.
        self._encoded: dict[GroupKey, str] = {}
        self._encoded_retired: str | None = None
        self._closed = False
        # Saves of the state file, in the order their documents were taken (under the
        # lock); the one behind new bindings' journal lines runs without the lock.
        self._write_lock = threading.Lock()
        self._write_pending = False
        self._set_aside: tuple[SetAsideGpu, ...] = ()
        self._submit_write = write_behind
        doc = store.load() if store is not None else None
        self._restore(doc)
        # After a lost ledger only PodResources knows which seats are held: no new
        # binding until it has answered (else a seat it shows held, or one it fences,
        # could be handed out twice), twice and GONE_CONFIRM_S apart, since a kubelet
        # that is restarting answers before its pods are back.
        self._awaiting_list = store is not None and store.lost is not None
        if doc is not None and doc["awaitingList"]:  # lost, then restarted too soon
            self._awaiting_list = True
        self._awaiting_since: float | None = None
        self._reserved, held_over = store.sidecar() if store is not None else (0, {})
        # After a lost ledger, the groups held over when it was lost stay pinned until
        # PodResources has been asked: a seat it shows held is adopted on the GPUs its
        # pod has, not on the ones the config gives its group now.
        self._lost_pins = held_over if self._awaiting_list else {}
        self._ledger.floor = doc["generationFloor"] if doc is not None else 0
        if store is not None and store.lost is not None:
            self._ledger.floor = max(self._ledger.floor, self._reserved, floor_after_loss(clock()))
            log.warning(
                "seat generations may have been lost (%s); every new generation starts above %d",
                store.lost,
                self._ledger.floor,
            )
        elif store is not None and store.crashed:
            # The journal may have lost lines without a trace (store docstring): start
            # above the reservation, or the wall clock where that is gone too.
            floor = self._reserved or (floor_after_loss(clock()) if self._ledger.highest() else 0)
            if floor > self._ledger.floor:
                self._ledger.floor = floor
                log.warning(
                    "%s was not saved at a clean stop; every new generation starts above %d",
                    store.path,
                    floor,
                )
        self._layout = Layout.of((), Topology(()))
        self._set_layout_locked(self._plan(self._pins_locked()))
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

    def wait_for_change(
        self, since: int, timeout_s: float, until: Callable[[], bool] | None = None
    ) -> int:
        """Block until the version differs from ``since``, the board closes, ``until()``
        holds (checked whenever the board is woken), or ``timeout_s`` passes."""
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    self._snapshot.version != since
                    or self._closed
                    or (until is not None and until())
                ),
                timeout_s,
            )
            return self._snapshot.version

    def wake(self) -> None:
        """Wake every ``wait_for_change`` to check its ``until``."""
        with self._changed:
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- allocation --------------------------------------------------------------

    def needs_observation(self, resource: ResourceName, requests: Sequence[Sequence[str]]) -> bool:
        """Whether an Allocate should first look at PodResources.

        Only a fenced seat does: its blocker may be gone. Which binding a request makes
        follows from the ledger alone (the kubelet offers a device to a new container
        only after freeing it; see ``ledger``).
        """
        if self._awaiting_list:
            return True
        views = self._snapshot.seats.get(resource, {})
        return any(
            (view := views.get(DeviceId(device_id))) is not None and view.state == "fenced"
            for ids in requests
            for device_id in ids
        )

    def set_windows(self, release_grace_s: float, handoff_s: float) -> None:
        """Config reload: the release grace period and the hand-off window."""
        with self._lock:
            self._ledger.release_grace_s = release_grace_s
            self._ledger.handoff_s = handoff_s

    def allocate(
        self,
        resource: ResourceName,
        requests: Sequence[Sequence[str]],
        observed: Mapping[SeatKey, Holder] | None = None,
    ) -> list[response.ContainerAllocation]:
        """Bind the seats of every container request, all or nothing."""
        with self._lock:
            if self._awaiting_list and observed is not None:
                self._reconcile_locked(observed)  # it may be the answer that ends the wait
                observed = None
            if self._awaiting_list:
                raise AllocationError(
                    "unavailable",
                    "the seat ledger was lost and PodResources has not yet answered twice, "
                    f"{GONE_CONFIRM_S:g}s apart, since; no new binding until it has (it "
                    "shows which seats are held)",
                )
            # What the observation changed is saved with the new binding, in one write.
            unsaved = observed is not None and self._reconcile_locked(observed, save=False)
            try:
                seats = self._validate(resource, requests)
            except AllocationError:
                if unsaved:
                    self._save()
                raise
            now, wall = self._monotonic(), self._clock()
            new: list[tuple[Seat, Bound]] = []
            answers: list[list[response.BoundSeat]] = []
            for container_seats in seats:
                bound: list[response.BoundSeat] = []
                for seat in container_seats:
                    made = self._ledger.bind(
                        (resource, seat.device_id), now, seat.group.name, seat.group.indices, wall
                    )
                    if made.is_new:
                        new.append((seat, made))
                    else:
                        # a repeat moves the binding's allocatedAt; the next save shows it
                        self._encoded.pop((resource, seat.group.name), None)
                    bound.append(response.BoundSeat(seat, made.generation))
                answers.append(bound)
            if new:
                groups = {(resource, seat.group) for seat, _ in new}
                shown = self._bindings_changed_locked(groups)
                try:
                    self._reserve_locked(max(made.generation for _, made in new))
                    self._persist_bindings_locked(
                        [(resource, seat.device_id) for seat, _ in new], whole=unsaved
                    )
                except OSError as exc:
                    for seat, made in reversed(new):
                        self._ledger.unbind((resource, seat.device_id), made)
                    self._bindings_changed_locked(groups)
                    if unsaved:  # what the observation changed is still worth keeping
                        self._save()
                    raise AllocationError(
                        "unavailable", f"could not persist the seat ledger: {exc}"
                    ) from exc
                if shown:
                    self._changed.notify_all()
                for seat, made in new:
                    where = {
                        "resource": resource,
                        "group": seat.group.name,
                        "seat": seat.device_id,
                        "gpus": seat.group.indices,
                    }
                    if made.replaced is not None:
                        log.info(
                            "seat released: %s",
                            "a new container was allocated it"
                            if made.replaced.holder is not None
                            else "a new container was allocated it after the hand-off window",
                            extra={**where, "generation": made.replaced.generation},
                        )
                    log.info("seat bound", extra={**where, "generation": made.generation})
            elif unsaved:
                self._save()
        return [
            response.build(
                resource,
                bound,
                strategy=self._policy.device_list_strategy,
                dev_root=self._dev_root,
                cuda_visible_devices=self._policy.cuda_visible_devices,
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
                "invalid", f"unknown device ID(s) for {resource}: {quote_some(unknown)}"
            )
        if duplicates:
            raise AllocationError(
                "invalid", f"device ID(s) requested more than once: {quote_some(duplicates)}"
            )
        views = self._snapshot.seats[resource]
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

    def preferred(
        self,
        resource: ResourceName,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
    ) -> list[DeviceId]:
        snapshot = self._snapshot
        views = snapshot.seats.get(resource, {})
        # The seats of one group in one condition rank alike but for their number:
        # placement ranks these pools (a few per group), not every available seat.
        pools: dict[tuple[GroupName, bool], list[DeviceId]] = {}
        for device_id in dict.fromkeys(cast("Sequence[DeviceId]", available)):
            view = views.get(device_id)
            if view is not None:
                pools.setdefault((view.group, view.state in GOOD_STATES), []).append(device_id)
        held = snapshot.held_per_group
        candidates = [
            placement.Candidate(group, good, held.get((resource, group), 0), tuple(seats))
            for (group, good), seats in pools.items()
        ]
        return placement.choose(
            candidates,
            cast("Sequence[DeviceId]", must_include),
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

    def list_can_change(self) -> bool:
        """Whether a PodResources ``List`` could change the ledger now: a binding is
        live (its holder may be gone, or seen for the first time), a lost ledger is
        being rebuilt, or a binding ended within ``release_grace_s`` (its holder may
        show up again: a kubelet that restarts answers before its pods are back). A
        ledger with none of these (an idle node) has nothing ``List`` could end or give
        back; a seat held that it does not know can only follow a lost ledger (rebuilt
        from the first answers after start) or a release (watched for this long)."""
        with self._lock:
            if self._awaiting_list or self._gone_pending:
                return True
            if next(self._ledger.held(), None) is not None:
                return True
            released = self._released_at
            return (
                released is not None
                and self._monotonic() - released <= self._ledger.release_grace_s
            )

    def reconcile(self, observed: Mapping[SeatKey, Holder]) -> bool:
        """Apply one successful PodResources ``List``; whether a seen holder is missing
        but not yet gone (ask again after ``ledger.GONE_CONFIRM_S``)."""
        with self._lock:
            self._reconcile_locked(observed)
            return self._gone_pending

    def _reconcile_locked(self, observed: Mapping[SeatKey, Holder], *, save: bool = True) -> bool:
        """Apply one observation; whether it changed anything (then saved if ``save``)."""
        now = self._monotonic()
        releases, seen, self._gone_pending = self._ledger.reconcile(observed, now)
        if self._awaiting_list:
            if self._awaiting_since is None:
                self._awaiting_since = now
            elif now - self._awaiting_since >= GONE_CONFIRM_S:
                self._awaiting_list = False
                log.info("PodResources answered twice since the seat ledger was lost: serving")
                if self._lost_pins:  # what no adopted seat holds is free to regroup
                    self._lost_pins = {}
                    self._replan_locked()
                    self._rebuild_locked()
                    self._changed.notify_all()
                if save:
                    self._save()
            self._gone_pending = self._gone_pending or self._awaiting_list
        for key, holder in observed.items():
            seat = self._layout.seat(*key)
            if seat is None or self._ledger.binding(key) is not None:
                continue
            generation = self._ledger.adopt(
                key, holder, now, seat.group.name, seat.group.indices, self._clock()
            )
            try:
                self._reserve_locked(generation)
            except OSError as exc:
                log.error("could not save the generation reservation: %s", exc)
            seen.append(key)
            log.warning(
                "seat adopted: PodResources shows it held by %s, the seat ledger had no "
                "binding (state lost?)",
                holder,
                extra={
                    "resource": key[0],
                    "group": seat.group.name,
                    "seat": key[1],
                    "gpus": seat.group.indices,
                    "generation": generation,
                },
            )
        if releases:
            self._released_at = now
        for release in releases:
            resource, device_id = release.key
            log.info(
                "seat released: %s",
                release.why,
                extra={
                    "resource": resource,
                    "group": release.group,
                    "seat": device_id,
                    "gpus": release.gpus,
                    "generation": release.generation,
                },
            )
        if not releases and not seen:
            return False
        seats = [self._layout.seat(*key) for key in [*(r.key for r in releases), *seen]]
        if releases and self._layout.held_over:
            # the config's own groups may take the place of a held-over one now
            self._replan_locked()
            self._rebuild_locked()
            shown = True
        elif all(seats):
            shown = self._bindings_changed_locked(
                {(s.resource, s.group) for s in seats if s is not None}
            )
        else:  # a seat the layout no longer has: its view comes or goes
            self._rebuild_locked()
            shown = True
        if save:
            self._save()
        if shown:
            self._changed.notify_all()
        return True

    def set_unhealthy(self, unhealthy: Mapping[str, str]) -> None:
        """Replace the set of unhealthy GPUs (UUID -> reason)."""
        with self._lock:
            if dict(unhealthy) != self._unhealthy:
                self._unhealthy = dict(unhealthy)
                self._changed_locked()

    def apply(self, plan: Plan | Layout | None = None, policy: Policy | None = None) -> None:
        """Swap in a new plan and/or policy (config reload, topology refresh).

        The new layout is decided here, under the lock, from the groups held now; a
        plan that raises :class:`LayoutError` changes nothing.
        """
        with self._lock:
            if plan is not None:
                new = _as_plan(plan)
                self._set_layout_locked(new(self._pins_locked()))
                self._plan = new
            if policy is not None:
                self._policy = policy
            self._changed_locked()

    def held_groups(self) -> Pins:
        """Groups with live bindings, per group size: they must not be regrouped."""
        with self._lock:
            return self._pins_locked()

    def _pins_locked(self) -> dict[int, list[tuple[GroupName, tuple[int, ...]]]]:
        pinned: dict[int, dict[str, tuple[int, ...]]] = {}
        for size, groups in self._lost_pins.items():
            for name, gpus in groups:
                pinned.setdefault(size, {})[name] = gpus
        for _, binding in self._ledger.held():
            pinned.setdefault(len(binding.gpus), {})[binding.group] = binding.gpus
        return {
            size: [(GroupName(name), gpus) for name, gpus in groups.items()]
            for size, groups in pinned.items()
        }

    def _replan_locked(self) -> None:
        try:
            layout = self._plan(self._pins_locked())
        except layout_mod.LayoutError as exc:  # fewer pins than the plan last met
            log.error("could not regroup after a release: %s", "; ".join(exc.problems))
            return
        self._set_layout_locked(layout)

    def _set_layout_locked(self, layout: Layout) -> None:
        """Swap the layout in; one log line per group that starts or stops being held
        over (not on every reload that keeps it so)."""
        before, after = set(self._layout.held_over), set(layout.held_over)
        for resource, group in layout.held_over:
            if (resource, group) not in before:
                log.info(
                    "group %s keeps its GPUs while seats are held on it; the configured "
                    "groups apply once they are released",
                    group.name,
                    extra={"resource": resource, "group": group.name, "gpus": group.indices},
                )
        for resource, group in self._layout.held_over:
            if (resource, group) not in after:
                log.info(
                    "group %s is no longer held over; the configured groups apply",
                    group.name,
                    extra={"resource": resource, "group": group.name, "gpus": group.indices},
                )
        if before != after and self._store is not None:
            try:
                self._store.save_sidecar(self._reserved, _held_over_pins(layout))
            except OSError as exc:
                log.error("could not save the held-over groups: %s", exc)
        self._layout = layout
        self._places = _places(layout)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def flush(self) -> None:
        """Save the whole state file now (the journal's lines included) and empty the
        journal; the runtime calls it at stop, after :meth:`close`."""
        with self._lock:
            self._save(clean=True)
            if self._store is not None:
                self._store.close()

    # ---- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The SPEC section 9 status document (the state file adds ledger detail), with
        ``setAsideGpus`` where discovery found GPUs it does not serve."""
        with self._lock:
            snapshot = self._snapshot
            doc: dict[str, Any] = {
                "resources": {
                    resource: {
                        "groups": {
                            name: self._group_document(resource, name, views, with_ledger=False)
                            for name, views in groups.items()
                        }
                    }
                    for resource, groups in snapshot.groups.items()
                }
            }
            if self._set_aside:
                doc["setAsideGpus"] = _set_aside_document(self._set_aside)
            return doc

    def set_aside_gpus(self, gpus: Sequence[SetAsideGpu]) -> None:
        """The GPUs discovery found but the plugin does not serve (status shows why)."""
        with self._lock:
            if tuple(gpus) == self._set_aside:
                return
            self._set_aside = tuple(gpus)
            self._save()

    def _state_fields(self) -> dict[str, str]:
        """The state document (the status shape with ledger detail, the retired seats'
        generations, the time), encoded for ``StateStore.save_encoded``. Only groups
        that changed since they were last encoded are encoded again."""
        snapshot = self._snapshot
        resources: dict[str, str] = {}
        for resource, groups in snapshot.groups.items():
            encoded: dict[str, str] = {}
            for name, views in groups.items():
                text = self._encoded.get((resource, name))
                if text is None:
                    text = self._encoded[(resource, name)] = encode(
                        self._group_document(resource, name, views, with_ledger=True)
                    )
                encoded[name] = text
            resources[resource] = encode_object({"groups": encode_object(encoded)})
        if self._encoded_retired is None:
            retired: dict[str, dict[str, Any]] = {}
            for key in self._ledger.keys():  # noqa: SIM118 (a ledger, not a dict)
                resource, device_id = key
                if device_id not in snapshot.seats.get(resource, {}):
                    retired.setdefault(resource, {})[device_id] = self._ledger.to_entry(key)
            self._encoded_retired = encode(retired)
        fields = {
            "resources": encode_object(resources),
            "retired": self._encoded_retired,
            "updatedAt": encode(self._clock()),
        }
        if self._ledger.floor:
            fields["generationFloor"] = encode(self._ledger.floor)
        if self._awaiting_list:
            fields["awaitingList"] = encode(True)
        if self._set_aside:
            fields["setAsideGpus"] = encode(_set_aside_document(self._set_aside))
        return fields

    def _group_document(
        self,
        resource: ResourceName,
        name: GroupName,
        views: Sequence[SeatView],
        *,
        with_ledger: bool,
    ) -> dict[str, Any]:
        place = self._places.get((resource, name))
        entry = self._group_entry(resource, name, place.group if place is not None else None)
        seats = entry["seats"]
        for view in views:
            seat: dict[str, Any] = {"state": view.state, "generation": view.generation}
            if view.why:
                seat["why"] = view.why
            if with_ledger:
                seat.update(self._ledger.to_entry((resource, view.device_id)))
            seats[view.device_id] = seat
        return entry

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
        """Health, layout or policy changed: rebuild, save, wake the streams."""
        self._rebuild_locked()
        self._save()
        self._changed.notify_all()

    def _rebuild_locked(self) -> None:
        self._encoded.clear()
        self._encoded_retired = None
        self._snapshot = self._build_snapshot(self._snapshot.version + 1)

    def _bindings_changed_locked(self, groups: Collection[tuple[ResourceName, Group]]) -> bool:
        """Publish the next snapshot after bindings in these layout groups came, went or
        changed holder: only they, and the other profiles' groups they fence, are shown
        anew. Equal to a full rebuild (tested), at a fraction of its cost. Returns
        whether a device list changed (a held seat is as healthy as a free one)."""
        touched = {(resource, group.name) for resource, group in groups}
        if not self._policy.allow_overprovision:
            for resource, group in groups:
                gpus = set(group.indices)
                touched.update(
                    key
                    for key, place in self._places.items()
                    if key[0] != resource and not gpus.isdisjoint(place.group.indices)
                )
        old = self._snapshot
        by_group, seats = dict(old.groups), dict(old.seats)
        devices, held_per_group = dict(old.devices), dict(old.held_per_group)
        for key in touched:
            shown_resource, name = key
            place = self._places[key]
            views, held_per_group[key] = self._group_views(shown_resource, place.group, place.seats)
            if by_group[shown_resource] is old.groups[shown_resource]:
                by_group[shown_resource] = dict(by_group[shown_resource])
                seats[shown_resource] = dict(seats[shown_resource])
            # the layout's seats first, then any the layout no longer has (kept as they are)
            by_group[shown_resource][name] = views + by_group[shown_resource][name][place.seats :]
            shown = devices[shown_resource]
            for position, view in enumerate(views, place.offset):
                seats[shown_resource][view.device_id] = view
                healthy = view.state in GOOD_STATES
                if shown[position].healthy != healthy:
                    if shown is old.devices[shown_resource]:
                        shown = devices[shown_resource] = list(shown)
                    shown[position] = DeviceView(view.device_id, healthy, place.group.numa_nodes)
            self._encoded.pop(key, None)
        self._snapshot = _Snapshot(old.version + 1, by_group, seats, devices, held_per_group)
        return any(devices[r] is not old.devices[r] for r in devices)

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

    def _group_views(
        self, resource: ResourceName, group: Group, seats: int
    ) -> tuple[tuple[SeatView, ...], int]:
        """The views of a layout group's seats, and how many of them are held."""
        sick = "; ".join(
            f"GPU {g.index} ({g.uuid}) {self._unhealthy[g.uuid]}"
            for g in group.gpus
            if g.uuid in self._unhealthy
        )
        fenced = "; ".join(self._fenced_by(resource, group))
        drained = group.name in self._policy.drain
        views: list[SeatView] = []
        held_count = 0
        for k in range(seats):
            device_id = seat_id(group.name, k)
            record = self._ledger.record((resource, device_id))
            held = record.binding is not None
            held_count += held
            state: SeatState
            why = ""
            if sick:
                state, why = "unhealthy", sick
            elif held:
                state = "held"
            elif fenced:
                state, why = "fenced", fenced
            elif drained:
                state, why = "drained", f"group {group.name} is draining"
            else:
                state = "free"
            views.append(SeatView(device_id, state, record.generation, group.name, why))
        return tuple(views), held_count

    def _build_snapshot(self, version: int) -> _Snapshot:
        snap = _Snapshot(version)
        for resource, profile in self._layout.profiles.items():
            by_group = snap.groups[resource] = {}
            seats = snap.seats[resource] = {}
            devices = snap.devices[resource] = []
            for group in profile.groups:
                views, held = self._group_views(resource, group, profile.spec.seats_per_group)
                by_group[group.name] = views
                snap.held_per_group[(resource, group.name)] = held
                for view in views:
                    seats[view.device_id] = view
                    devices.append(
                        DeviceView(view.device_id, view.state in GOOD_STATES, group.numa_nodes)
                    )
        for (resource, device_id), binding in self._ledger.held():
            seats = snap.seats.setdefault(resource, {})
            if device_id in seats:
                continue
            view = SeatView(
                device_id,
                "unhealthy",
                binding.generation,
                GroupName(binding.group),
                "seat no longer in the config; kept until released",
            )
            seats[device_id] = view
            by_group = snap.groups.setdefault(resource, {})
            by_group[view.group] = (*by_group.get(view.group, ()), view)
            snap.devices.setdefault(resource, []).append(DeviceView(device_id, False, ()))
        return snap

    def _restore(self, doc: Mapping[str, Any] | None) -> None:
        """Take the ledger from a state document as ``StateStore.load`` gives it: every
        entry there is checked already (a damaged one lost its binding in the store)."""
        if doc is None:
            return
        now = self._monotonic()
        for resource, body in doc["resources"].items():
            for group in body["groups"].values():
                for device_id, entry in group["seats"].items():
                    self._ledger.restore((resource, device_id), entry, now)
        for resource, seats in doc["retired"].items():
            for device_id, entry in seats.items():
                self._ledger.restore((resource, device_id), entry, now)

    def _reserve_locked(self, generation: int) -> None:
        """Make sure the reservation on disk is above ``generation`` before it is handed
        out (one durable write per ``RESERVE_AHEAD`` generations)."""
        if self._store is None or generation < self._reserved:
            return
        below = min(generation + RESERVE_AHEAD, MAX_GENERATION)
        self._store.save_sidecar(below, _held_over_pins(self._layout))
        self._reserved = below

    def _persist_bindings_locked(self, keys: Sequence[SeatKey], *, whole: bool) -> None:
        """Make new bindings durable before their Allocate answers: a line appended to
        the store's journal, the state file written behind it (for its readers, and to
        empty the journal). ``whole``: what the Allocate's observation changed goes too,
        so the whole file is written now (a journal line holds only new bindings; a
        release it missed would come back at a restart, under a binding it fenced).
        Raises ``OSError`` when they may not be durable."""
        store = self._store
        if store is None:
            return
        if whole or store.journal_full:
            self._write_locked(store)
            return
        store.append(
            [(resource, seat, self._ledger.to_entry((resource, seat))) for resource, seat in keys]
        )
        if not self._write_pending:
            self._write_pending = True
            self._submit_write(self._write_behind)

    def _write_behind(self) -> None:
        """Save the state file after bindings went to the journal, off the Allocate's
        path; then empty the journal, unless more lines came meanwhile (the next write
        behind them will)."""
        store = self._store
        assert store is not None
        with self._lock:
            if not self._write_pending or self._closed:
                return  # a save came first; at close, the runtime's flush saves
            self._write_pending = False
            fields = self._state_fields()
            appended = store.appended
            self._write_lock.acquire()  # taken under the lock: saves land in order
        try:
            store.save_encoded(fields)
        except OSError as exc:
            log.error("could not save the seat ledger to %s: %s", store.path, exc)
            return  # the journal still holds the bindings
        finally:
            self._write_lock.release()
        with self._lock:
            if store.appended == appended:
                store.empty_journal()

    def _write_locked(self, store: StateStore, *, clean: bool = False) -> None:
        with self._write_lock:
            store.save_encoded(self._state_fields(), clean=clean)
            self._write_pending = False
            store.empty_journal()

    def _save(self, *, clean: bool = False) -> None:
        if self._store is None:
            return
        try:
            self._write_locked(self._store, clean=clean)
        except OSError as exc:
            log.error("could not save the seat ledger to %s: %s", self._store.path, exc)


def _set_aside_document(gpus: Sequence[SetAsideGpu]) -> list[dict[str, Any]]:
    return [{"index": g.index, "uuid": g.uuid, "why": g.why} for g in gpus]


def _held_over_pins(layout: Layout) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
    pins: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for _, group in layout.held_over:
        pins.setdefault(len(group.gpus), []).append((group.name, group.indices))
    return pins


def _as_plan(plan: Plan | Layout) -> Plan:
    return layout_mod.fixed(plan) if isinstance(plan, Layout) else plan


def _places(layout: Layout) -> dict[GroupKey, _Place]:
    places: dict[GroupKey, _Place] = {}
    for resource, profile in layout.profiles.items():
        per_group = profile.spec.seats_per_group
        for position, group in enumerate(profile.groups):
            places[(resource, group.name)] = _Place(group, position * per_group, per_group)
    return places
