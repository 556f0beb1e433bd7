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
from pathlib import Path
from typing import Any, cast

from pkg.deviceplugin.allocator import durable, placement, response, status, views
from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.document import StatusDoc
from pkg.deviceplugin.allocator.layout import Group, Layout, Pins, Plan, Seat
from pkg.deviceplugin.allocator.ledger import (
    GONE_CONFIRM_S,
    HANDOFF_S,
    Bound,
    Holder,
    Ledger,
    Release,
    SeatKey,
)
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError, validate
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
        dev_root: Path = Path("/"),
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
        self._dev_root = dev_root
        self._ledger = Ledger(release_grace_s, handoff_s)
        self._gone_pending = False
        self._released_at: float | None = None
        """Monotonic time of the last release (see :meth:`list_can_change`)."""
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
        self._awaiting_list = recovered.awaiting_list
        self._awaiting_since: float | None = None
        self._lost_pins = recovered.lost_pins
        self._layout = Layout.of((), Topology(()))
        self._set_layout_locked(self._plan(self._pins_locked()))
        self._snapshot = self._build_snapshot(1)
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

    def needs_observation(self, resource: ResourceName, requests: Sequence[Sequence[str]]) -> bool:
        """Whether an Allocate should first look at PodResources.

        Only a fenced seat does: its blocker may be gone. Which binding a request makes
        follows from the ledger alone (the kubelet offers a device to a new container
        only after freeing it; see ``ledger``).
        """
        if self._awaiting_list:
            return True
        shown = self._snapshot.seats.get(resource, {})
        return any(
            (view := shown.get(DeviceId(device_id))) is not None and view.state == "fenced"
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
                shown = self._snapshot.seats.get(resource, {})
                seats = validate(self._layout, shown, resource, requests)
            except AllocationError:
                if unsaved:
                    self._saver.save()
                raise
            answers = self._bind_locked(resource, seats, unsaved)
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

    def _bind_locked(
        self, resource: ResourceName, seats: list[list[Seat]], unsaved: bool
    ) -> list[list[response.BoundSeat]]:
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
                else:  # a repeat moves the binding's allocatedAt; the next save shows it
                    self._encoder.forget((resource, seat.group.name))
                bound.append(response.BoundSeat(seat, made.generation))
            answers.append(bound)
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
        if shown:
            self._changed.notify_all()
        for seat, made in new:
            _log_bound(seat, made)
        return answers

    def preferred(
        self,
        resource: ResourceName,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
    ) -> list[DeviceId]:
        snapshot = self._snapshot
        return placement.prefer(
            snapshot.seats.get(resource, {}),
            snapshot.held_per_group,
            resource,
            cast("Sequence[DeviceId]", available),
            cast("Sequence[DeviceId]", must_include),
            size,
            strategy=self._policy.placement,
            closeness=self._closeness.of(self._layout, resource),
        )

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
                    self._saver.save()
            self._gone_pending = self._gone_pending or self._awaiting_list
        for key, holder in observed.items():
            seat = self._layout.seat(*key)
            if seat is None or self._ledger.binding(key) is not None:
                continue
            generation = self._ledger.adopt(
                key, holder, now, seat.group.name, seat.group.indices, self._clock()
            )
            try:
                self._saver.reserve(generation, self._layout)
            except OSError as exc:
                log.error("could not save the generation reservation: %s", exc)
            seen.append(key)
            _log_adopted(seat, holder, generation)
        if releases:
            self._released_at = now
        for release in releases:
            _log_released(release)
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
                self._set_layout_locked(new(self._pins_locked()))
                self._plan = new
            if policy is not None:
                self._policy = policy
            self._changed_locked()

    def held_groups(self) -> Pins:
        """Groups with live bindings, per group size: they must not be regrouped."""
        with self._lock:
            return self._pins_locked()

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

    def _pins_locked(self) -> dict[int, list[tuple[GroupName, tuple[int, ...]]]]:
        pinned: dict[int, dict[GroupName, tuple[int, ...]]] = {}
        for size, groups in self._lost_pins.items():
            for name, gpus in groups:
                pinned.setdefault(size, {})[name] = gpus
        for _, binding in self._ledger.held():
            pinned.setdefault(len(binding.gpus), {})[GroupName(binding.group)] = binding.gpus
        return {size: list(groups.items()) for size, groups in pinned.items()}

    def _replan_locked(self) -> None:
        try:
            layout = self._plan(self._pins_locked())
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

    def _build_snapshot(self, version: int) -> views.Snapshot:
        return views.build(self._facts(), version)

    def _state_fields(self) -> dict[str, str]:
        return self._encoder.fields(
            self._snapshot,
            self._facts(),
            set_aside=self._set_aside,
            awaiting_list=self._awaiting_list,
            now=self._clock(),
        )

    def _changed_locked(self) -> None:
        """Health, layout or policy changed: rebuild, save, wake the streams."""
        self._rebuild_locked()
        self._saver.save()
        self._changed.notify_all()

    def _rebuild_locked(self) -> None:
        self._encoder.forget_all()
        self._snapshot = self._build_snapshot(self._snapshot.version + 1)

    def _bindings_changed_locked(self, groups: Collection[tuple[ResourceName, Group]]) -> bool:
        """Publish the next snapshot after bindings in these layout groups changed;
        whether a device list changed (see :func:`views.update`)."""
        self._snapshot, touched, shown = views.update(self._snapshot, self._facts(), groups)
        for key in touched:
            self._encoder.forget(key)
        return shown


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


def _log_adopted(seat: Seat, holder: Holder, generation: int) -> None:
    log.warning(
        "seat adopted: PodResources shows it held by %s, the seat ledger had no binding "
        "(state lost?)",
        holder,
        extra={**_where(seat), "generation": generation},
    )


def _log_released(release: Release) -> None:
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
