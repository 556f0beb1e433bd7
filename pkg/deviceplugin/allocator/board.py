"""The seat board: one shared, thread-safe view of every profile's seats.

It joins the layout (groups and seats), the ledger (generations and bindings), GPU
health, and the operator's policy (overprovisioning, drain, placement), and keeps
under its lock what must change together: bindings, health, fencing, allocation. What
readers see comes from :mod:`views` (published snapshots), the documents from
:mod:`status`, the saving from :mod:`durable`. Every change bumps a version; one that
changes a device list also wakes the ListAndWatch streams at once (the others they
notice at their next poll, and send nothing). No gRPC, no NVML here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from pkg.deviceplugin.allocator import durable, placement, response, status, views
from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.document import StatusDoc
from pkg.deviceplugin.allocator.layout import Group, Layout, Pins, Plan, Seat
from pkg.deviceplugin.allocator.ledger import (
    HANDOFF_S,
    Bound,
    Holder,
    Ledger,
    Release,
    SeatKey,
)
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError, Requests, validate
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.views import DeviceView, SeatView
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName, SetAsideGpu, Topology

log = logging.getLogger(__name__)


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
        write_behind: Callable[[Callable[[], None]], object] = durable.write_later,
    ) -> None:
        """``clock``: wall time, only for what the state file shows people;
        ``monotonic``: every time the ledger's rules measure; ``write_behind``: runs
        the state file's write behind new bindings' journal lines, later."""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._plan = _as_plan(plan)
        self._policy = policy
        self._clock = clock
        self._monotonic = monotonic
        self._ledger = Ledger(release_grace_s, handoff_s)
        self._gone_pending = False
        self._unhealthy: dict[str, str] = {}
        self._closeness = placement.Closeness()
        self._encoder = status.StateEncoder()
        self._closed = False
        self._set_aside: tuple[SetAsideGpu, ...] = ()
        recovered = durable.recover(store, self._ledger, clock(), monotonic())
        self._saver = durable.Saver(
            store,
            self._lock,
            self._state_fields,
            lambda: self._closed,
            reserved=recovered.reserved,
            write_behind=write_behind,
        )
        self._lost = recovered.lost
        self._layout = Layout.of((), Topology(()))
        self._set_layout_locked(self._plan(_pins(self._lost.pins, self._ledger)))
        self._snapshot = views.build(self._facts(), 1)
        self._saver.save()

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

    @property
    def closed(self) -> bool:
        return self._closed

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

    def status(self) -> StatusDoc:
        """The SPEC section 9 status document (the state file adds ledger detail)."""
        with self._lock:
            return status.status(self._snapshot, self._facts(), self._set_aside)

    # ---- allocation --------------------------------------------------------------

    def needs_observation(self, resource: ResourceName, requests: Requests) -> bool:
        """Whether an Allocate should first look at PodResources.

        Only a fenced seat does: its blocker may be gone. Which binding a request makes
        follows from the ledger alone (the kubelet offers a device to a new container
        only after freeing it; see ``ledger``).
        """
        if self._lost.awaiting:
            return True
        shown = self._snapshot.seats.get(resource, {})
        return any(
            (view := shown.get(device_id)) is not None and view.state == "fenced"
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
        requests: Requests,
        observed: Mapping[SeatKey, Holder] | None = None,
    ) -> list[list[response.BoundSeat]]:
        """Bind the seats of every container request, all or nothing; each one's seats
        with their generations (``response.build`` makes the container's answer).

        The init-to-app hand-off window is measured from one answer leaving to the next
        request arriving, the kubelet's own gap: not from before the lock (a save by
        another thread may hold it) nor to after the durable write (an fsync on a busy
        disk can take longer than the window)."""
        arrived = self._monotonic()
        with self._lock:
            if self._lost.awaiting and observed is not None:
                self._reconcile_locked(observed)  # it may be the answer that ends the wait
                observed = None
            if self._lost.awaiting:
                raise self._lost.refusal()
            # What the observation changed is saved with the new binding, in one write.
            unsaved = observed is not None and self._reconcile_locked(observed, save=False)
            try:
                shown = self._snapshot.seats.get(resource, {})
                seats = validate(self._layout, shown, resource, requests)
            except AllocationError:
                if unsaved:
                    self._saver.save()
                raise
            return self._bind_locked(resource, seats, unsaved, arrived)

    def _bind_locked(
        self, resource: ResourceName, seats: list[list[Seat]], unsaved: bool, arrived: float
    ) -> list[list[response.BoundSeat]]:
        answers, new, repeated = _bind_all(self._ledger, seats, arrived, self._clock())
        for group in repeated:  # a repeat moved its binding's allocatedAt
            self._encoder.forget((resource, group))
        if not new:
            if unsaved:
                self._saver.save()
            return answers
        groups = {(resource, seat.group) for seat, _ in new}
        shown = self._bindings_changed_locked(groups)
        try:
            self._saver.reserve(max(made.generation for _, made in new), self._layout)
            keys = [(resource, seat.device_id) for seat, _ in new]
            self._saver.persist(
                [(r, s, self._ledger.to_entry((r, s))) for r, s in keys], whole=unsaved
            )
        except OSError as exc:
            for seat, made in reversed(new):
                self._ledger.unbind((resource, seat.device_id), made)
            self._bindings_changed_locked(groups)
            if unsaved:  # what the observation changed is still worth keeping
                self._saver.save()
            raise AllocationError(
                "unavailable", f"could not persist the seat ledger: {exc}"
            ) from exc
        self._ledger.answered(keys, self._monotonic())
        if shown:
            self._changed.notify_all()
        for seat, made in new:
            _log_bound(seat, made)
        return answers

    def preferred(
        self,
        resource: ResourceName,
        available: Sequence[DeviceId],
        must_include: Sequence[DeviceId],
        size: int,
    ) -> list[DeviceId]:
        closeness = self._closeness.of(self._layout, resource)
        return placement.prefer(
            self._snapshot, resource, available, must_include, size, self._policy, closeness
        )

    # ---- evidence from the kubelet and the GPUs -------------------------------------

    def list_can_change(self) -> bool:
        """Whether a PodResources ``List`` could change the ledger now: a lost ledger
        is being rebuilt, a holder is missing but not yet gone, or the ledger is
        watching (:meth:`Ledger.watching`)."""
        with self._lock:
            return (
                self._lost.awaiting
                or self._gone_pending
                or self._ledger.watching(self._monotonic())
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
        if self._lost.awaiting and self._lost.answered(now):
            log.info("PodResources answered twice since the seat ledger was lost: serving")
            if self._lost.pins:  # what no adopted seat holds is free to regroup
                self._lost.pins = {}
                self._replan_locked()
                self._rebuild_locked()
                self._changed.notify_all()
            if save:
                self._saver.save()
        self._gone_pending = self._gone_pending or self._lost.awaiting
        adopted = _adopt_all(self._ledger, self._layout, observed, now, self._clock())
        if adopted:
            try:
                self._saver.reserve(max(adopted.values()), self._layout)
            except OSError as exc:
                log.error("could not save the generation reservation: %s", exc)
        seen.extend(adopted)
        _log_released(releases)
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
            self._saver.save()
        if shown:
            self._changed.notify_all()
        return True

    def set_unhealthy(self, unhealthy: Mapping[str, str]) -> None:
        """Replace the set of unhealthy GPUs (UUID -> reason)."""
        with self._lock:
            if dict(unhealthy) != self._unhealthy:
                self._unhealthy = dict(unhealthy)
                self._changed_locked()

    def set_aside_gpus(self, gpus: Sequence[SetAsideGpu]) -> None:
        """The GPUs discovery found but the plugin does not serve (status shows why)."""
        with self._lock:
            if tuple(gpus) != self._set_aside:
                self._set_aside = tuple(gpus)
                self._saver.save()

    def apply(self, plan: Plan | Layout | None = None, policy: Policy | None = None) -> None:
        """Swap in a new plan and/or policy (config reload, topology refresh).

        The new layout is decided here, under the lock, from the groups held now; a
        plan that raises :class:`LayoutError` changes nothing.
        """
        with self._lock:
            if plan is not None:
                new = _as_plan(plan)
                self._set_layout_locked(new(_pins(self._lost.pins, self._ledger)))
                self._plan = new
            if policy is not None:
                self._policy = policy
            self._changed_locked()

    def held_groups(self) -> Pins:
        """Groups with live bindings, per group size: they must not be regrouped."""
        with self._lock:
            return _pins(self._lost.pins, self._ledger)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def flush(self) -> None:
        """Save the whole state file now (the journal's lines included) and empty the
        journal; the runtime calls it at stop, after :meth:`close`."""
        with self._lock:
            self._saver.flush()

    # ---- internals ---------------------------------------------------------------

    def _replan_locked(self) -> None:
        try:
            layout = self._plan(_pins(self._lost.pins, self._ledger))
        except layout_mod.LayoutError as exc:  # fewer pins than the plan last met
            log.error("could not regroup after a release: %s", "; ".join(exc.problems))
            return
        self._set_layout_locked(layout)

    def _set_layout_locked(self, layout: Layout) -> None:
        if _log_held_over(self._layout, layout):
            self._saver.held_over_changed(layout)
        self._layout = layout
        self._places = views.places(layout)

    def _facts(self) -> views.Facts:
        return views.Facts(self._layout, self._places, self._ledger, self._unhealthy, self._policy)

    def _state_fields(self) -> dict[str, str]:
        return self._encoder.fields(
            self._snapshot,
            self._facts(),
            set_aside=self._set_aside,
            awaiting_list=self._lost.awaiting,
            now=self._clock(),
        )

    def _changed_locked(self) -> None:
        """Health, layout or policy changed: rebuild, save, wake the streams."""
        self._rebuild_locked()
        self._saver.save()
        self._changed.notify_all()

    def _rebuild_locked(self) -> None:
        self._encoder.forget_all()
        self._snapshot = views.build(self._facts(), self._snapshot.version + 1)

    def _bindings_changed_locked(self, groups: Collection[tuple[ResourceName, Group]]) -> bool:
        """Publish the next snapshot after bindings in these layout groups changed;
        whether a device list changed (see :func:`views.update`)."""
        self._snapshot, touched, shown = views.update(self._snapshot, self._facts(), groups)
        for key in touched:
            self._encoder.forget(key)
        return shown


def _bind_all(
    ledger: Ledger, seats: Sequence[Sequence[Seat]], now: float, wall: float
) -> tuple[list[list[response.BoundSeat]], list[tuple[Seat, Bound]], set[GroupName]]:
    """Bind every container's seats: each one's bound seats, the new bindings, and the
    groups of the repeated ones (the init-to-app hand-off)."""
    answers: list[list[response.BoundSeat]] = []
    new: list[tuple[Seat, Bound]] = []
    repeated: set[GroupName] = set()
    for container in seats:
        bound: list[response.BoundSeat] = []
        for seat in container:
            key = (seat.resource, seat.device_id)
            made = ledger.bind(key, now, seat.group.name, seat.group.indices, wall)
            if made.is_new:
                new.append((seat, made))
            else:
                repeated.add(seat.group.name)
            bound.append(response.BoundSeat(seat, made.generation))
        answers.append(bound)
    return answers, new, repeated


def _adopt_all(
    ledger: Ledger, layout: Layout, observed: Mapping[SeatKey, Holder], now: float, wall: float
) -> dict[SeatKey, int]:
    """Bind each seat ``List`` shows held that the ledger has no binding for (its state
    was lost) to its holder: the seats and their generations."""
    adopted: dict[SeatKey, int] = {}
    for key, holder in observed.items():
        seat = layout.seat(*key)
        if seat is None or ledger.binding(key) is not None:
            continue
        generation = ledger.adopt(key, holder, now, seat.group.name, seat.group.indices, wall)
        adopted[key] = generation
        log.warning(
            "seat adopted: PodResources shows it held by %s, the seat ledger had no binding "
            "(state lost?)",
            holder,
            extra={**_where(seat), "generation": generation},
        )
    return adopted


def _pins(lost: Pins, ledger: Ledger) -> Pins:
    """Groups that must not be regrouped: those with live bindings, and those pinned
    while a lost ledger is rebuilt."""
    pinned: dict[int, dict[GroupName, tuple[int, ...]]] = {}
    for size, groups in lost.items():
        for name, gpus in groups:
            pinned.setdefault(size, {})[name] = gpus
    for _, binding in ledger.held():
        pinned.setdefault(len(binding.gpus), {})[GroupName(binding.group)] = binding.gpus
    return {size: list(groups.items()) for size, groups in pinned.items()}


def _as_plan(plan: Plan | Layout) -> Plan:
    return layout_mod.fixed(plan) if isinstance(plan, Layout) else plan


def _log_held_over(old: Layout, new: Layout) -> bool:
    """One log line per group that starts or stops being held over (not on every reload
    that keeps it so); whether any did."""
    before, after = set(old.held_over), set(new.held_over)
    for resource, group in new.held_over:
        if (resource, group) not in before:
            log.info(
                "group %s keeps its GPUs while seats are held on it; the configured "
                "groups apply once they are released",
                group.name,
                extra={"resource": resource, "group": group.name, "gpus": group.indices},
            )
    for resource, group in old.held_over:
        if (resource, group) not in after:
            log.info(
                "group %s is no longer held over; the configured groups apply",
                group.name,
                extra={"resource": resource, "group": group.name, "gpus": group.indices},
            )
    return before != after


def _where(seat: Seat) -> dict[str, Any]:
    return {
        "resource": seat.resource,
        "group": seat.group.name,
        "seat": seat.device_id,
        "gpus": seat.group.indices,
    }


def _log_bound(seat: Seat, made: Bound) -> None:
    where = _where(seat)
    if made.replaced is not None:
        log.info(
            "seat released: %s",
            "a new container was allocated it"
            if made.replaced.holder is not None
            else "a new container was allocated it after the hand-off window",
            extra={**where, "generation": made.replaced.generation},
        )
    log.info("seat bound", extra={**where, "generation": made.generation})


def _log_released(releases: Sequence[Release]) -> None:
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
