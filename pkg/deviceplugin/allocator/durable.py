"""Keeping a board's seat ledger on disk: what it starts from, and how it is saved.

A new binding is durable before its Allocate answers: a line appended to the store's
journal, the whole state file written behind it, off the Allocate's path (its readers
see it; it empties the journal). Generations are reserved ahead on disk, so a crash
can never hand one out twice. At start the ledger comes back from the state file and
the journal; where they may have lost something, every new generation starts above
anything that could have been handed out before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pkg.deviceplugin.allocator.document import LedgerEntry
from pkg.deviceplugin.allocator.layout import Layout, Pins
from pkg.deviceplugin.allocator.ledger import GONE_CONFIRM_S, Ledger, floor_after_loss
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import MAX_GENERATION, StateStore
from pkg.deviceplugin.types import DeviceId, GroupName, ResourceName

log = logging.getLogger(__name__)

_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kyb-state-writer")
"""Writes the state file behind the journal, for every board of the process."""
WRITE_BEHIND_S = 0.02
"""How long the state file's write waits behind a new binding's journal line for more
to come: a burst of bindings is saved once, and no save's fsync is in flight while the
next Allocate waits for its line's ``fdatasync`` (that costs it about 0.5 ms here)."""
RESERVE_AHEAD = 1000
"""How far the generation reservation runs ahead of the highest generation handed out:
one durable write per this many, and how far generations jump after a crash."""


def write_later(write: Callable[[], None]) -> None:
    def delayed() -> None:
        time.sleep(WRITE_BEHIND_S)
        write()

    _WRITER.submit(delayed)


def settle() -> None:
    """Wait until every state file write queued behind journal lines so far has landed
    (or found its board closed): then the files are what a restart would load."""
    _WRITER.submit(lambda: None).result()


class LostLedger:
    """While a lost ledger is rebuilt (``awaiting``): no new binding until PodResources
    has answered, twice and ``GONE_CONFIRM_S`` apart, since a kubelet that is restarting
    answers before its pods are back (else a seat it shows held, or one it fences,
    could go twice). ``pins``: the groups held over when it was lost, pinned until then,
    so that a seat it shows held is adopted on the GPUs its pod has, not on the ones the
    config gives its group now."""

    def __init__(self, awaiting: bool, pins: Pins) -> None:
        self.awaiting = awaiting
        self.pins = pins if awaiting else {}
        self._since: float | None = None

    def answered(self, now: float) -> bool:
        """One successful ``List`` while awaiting (``now``: monotonic); whether it is
        the one that ends the wait."""
        if self._since is None:
            self._since = now
        elif now - self._since >= GONE_CONFIRM_S:
            self.awaiting = False
            return True
        return False

    def refusal(self) -> AllocationError:
        return AllocationError(
            "unavailable",
            "the seat ledger was lost and PodResources has not yet answered twice, "
            f"{GONE_CONFIRM_S:g}s apart, since; no new binding until it has (it shows "
            "which seats are held)",
        )


@dataclass(frozen=True)
class Recovered:
    """What a board starts from besides its ledger."""

    lost: LostLedger
    reserved: int


def recover(store: StateStore | None, ledger: Ledger, wall: float, now: float) -> Recovered:
    """Restore ``ledger`` from ``store`` and set its generation floor (``wall``: the
    wall clock, ``now``: monotonic, when a restored binding's grace starts)."""
    if store is None:
        return Recovered(LostLedger(False, {}), 0)
    doc = store.load()
    if doc is not None:
        for resource, body in doc["resources"].items():
            for group in body["groups"].values():
                for device_id, entry in group["seats"].items():
                    ledger.restore((ResourceName(resource), DeviceId(device_id)), entry, now)
        for resource, seats in doc["retired"].items():
            for device_id, entry in seats.items():
                ledger.restore((ResourceName(resource), DeviceId(device_id)), entry, now)
    awaiting = store.lost is not None or (doc is not None and doc["awaitingList"])
    reserved, held_over = store.sidecar()
    ledger.floor = doc["generationFloor"] if doc is not None else 0
    if store.lost is not None:
        ledger.floor = max(ledger.floor, reserved, floor_after_loss(wall))
        log.warning(
            "seat generations may have been lost (%s); every new generation starts above %d",
            store.lost,
            ledger.floor,
        )
    elif store.crashed:
        # The journal may have lost lines without a trace (store docstring): start
        # above the reservation, or the wall clock where that is gone too.
        floor = reserved or (floor_after_loss(wall) if ledger.highest() else 0)
        if floor > ledger.floor:
            ledger.floor = floor
            log.warning(
                "%s was not saved at a clean stop; every new generation starts above %d",
                store.path,
                floor,
            )
    return Recovered(LostLedger(awaiting, held_over), reserved)


class Saver:
    """Saves one board's ledger to its store (none: nothing is saved). ``fields`` gives
    the state file's fields and is called under ``lock``, the board's; ``closed`` says
    whether the board closed (a write behind then leaves the save to the flush)."""

    def __init__(
        self,
        store: StateStore | None,
        lock: threading.RLock,
        fields: Callable[[], dict[str, str]],
        closed: Callable[[], bool],
        *,
        reserved: int,
        write_behind: Callable[[Callable[[], None]], object] = write_later,
    ) -> None:
        self.store = store
        self.reserved = reserved
        self._lock = lock
        self._fields = fields
        self._closed = closed
        self._submit = write_behind
        # Saves of the state file, in the order their documents were taken (under the
        # lock); the one behind new bindings' journal lines runs without the lock.
        self._write_lock = threading.Lock()
        self._pending = False

    def reserve(self, generation: int, layout: Layout) -> None:
        """Make sure the reservation on disk is above ``generation`` before it is handed
        out (one durable write per ``RESERVE_AHEAD`` generations)."""
        if self.store is None or generation < self.reserved:
            return
        below = min(generation + RESERVE_AHEAD, MAX_GENERATION)
        self.store.save_sidecar(below, held_over_pins(layout))
        self.reserved = below

    def held_over_changed(self, layout: Layout) -> None:
        if self.store is None:
            return
        try:
            self.store.save_sidecar(self.reserved, held_over_pins(layout))
        except OSError as exc:
            log.error("could not save the held-over groups: %s", exc)

    def persist(self, entries: Sequence[tuple[str, str, LedgerEntry]], *, whole: bool) -> None:
        """Make new bindings (resource, seat, ledger entry) durable before their
        Allocate answers: a journal line, the state file written behind it. ``whole``:
        what the Allocate's observation changed goes too, so the whole file is written
        now (a journal line holds only new bindings; a release it missed would come back
        at a restart, under a binding it fenced). Raises ``OSError`` when they may not
        be durable. Called under the lock."""
        store = self.store
        if store is None:
            return
        if whole or store.journal_full:
            self._write(store)
            return
        store.append(entries)
        if not self._pending:
            self._pending = True
            self._submit(self._write_behind)

    def _write_behind(self) -> None:
        """Save the state file after bindings went to the journal, off the Allocate's
        path; then empty the journal, unless more lines came meanwhile (the next write
        behind them will)."""
        store = self.store
        assert store is not None
        with self._lock:
            if not self._pending or self._closed():
                return  # a save came first; at close, the runtime's flush saves
            self._pending = False
            fields = self._fields()
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
            # closed: the stop's flush saves and empties the journal, then closes it
            # (emptying it after that would open it again)
            if store.appended == appended and not self._closed():
                store.empty_journal()

    def _write(self, store: StateStore, *, clean: bool = False) -> None:
        with self._write_lock:
            store.save_encoded(self._fields(), clean=clean)
            self._pending = False
            store.empty_journal()

    def save(self, *, clean: bool = False) -> None:
        """Write the whole state file now (under the lock); a failure is logged."""
        if self.store is None:
            return
        try:
            self._write(self.store, clean=clean)
        except OSError as exc:
            log.error("could not save the seat ledger to %s: %s", self.store.path, exc)

    def flush(self) -> None:
        """The save at a clean stop (it marks the file so), then the journal is closed."""
        self.save(clean=True)
        if self.store is not None:
            self.store.close()


def held_over_pins(layout: Layout) -> dict[int, list[tuple[GroupName, tuple[int, ...]]]]:
    pins: dict[int, list[tuple[GroupName, tuple[int, ...]]]] = {}
    for _, group in layout.held_over:
        pins.setdefault(len(group.gpus), []).append((group.name, group.indices))
    return pins
