"""The seat ledger: per seat its highest generation and its live binding, if any.

Rules (SPEC section 4):
- The kubelet hands a device to a new container only after freeing it from the last
  one, with one exception: the init-to-app hand-off, in which it re-sends the same IDs
  for the next container of the same pod, back to back during that pod's admission.
  So an Allocate of a seat with a live binding is that same binding (same generation)
  only if its holder was never seen in PodResources ``List`` (``List`` never shows
  plain init containers) and it comes within ``handoff_s`` of the binding's last
  Allocate (from its answer, made durable, to the next request). Anything else is a
  new holder, one generation higher: a pod that was seen, or that lived longer than
  the window, never passes its generation on.
- Generations never go back and are never reused, whatever happens to the layout.
- A binding ends only on evidence: its holder was seen in ``List`` and is missing from
  at least two successful ``List`` answers ``gone_confirm_s`` apart (a kubelet that is
  restarting answers before its pods are back: one empty answer proves nothing), or it
  was never seen there within ``release_grace_s`` of its last Allocate. A holder that
  shows up again while its seat is still free gets its binding back, same generation.
- ``List`` is evidence the other way too: a seat it shows held that the ledger has no
  binding for (its state was lost) is adopted, one generation above what is known.
- A ledger that was lost (state file missing from a used state directory, set aside, or
  with damaged entries) cannot say which generations were handed out: every generation
  after it starts above a floor, saved with the ledger: the generation reservation kept
  next to the state file (every generation handed out is below it; the board writes it
  once per thousand generations) where it survived, and the wall clock
  (:func:`floor_after_loss`), whichever is higher. So KYB_SEAT_GEN counts 1, 2, 3 on a
  node that never lost its ledger, and jumps to a large number (about 2e14 in 2026)
  after a loss, never back, even across a wall-clock step while the reservation lasts.
- After a crash (a state file not saved at a clean stop) the journal's last lines could
  be gone without a trace, so the floor is the reservation: generations jump by at most
  a thousand, and go on counting from there.
- Times are on the monotonic clock: a wall-clock step neither releases a binding early
  nor keeps one late. Only the wall-clock time of the last Allocate is saved (for
  people); a restored binding's grace and hand-off window start afresh at the restart,
  and a restored binding never seen is past its hand-off.

The ledger is not thread-safe; its owner (the seat board) holds the lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from pkg.deviceplugin.allocator.document import HolderDoc, LedgerEntry
from pkg.deviceplugin.types import DeviceId, ResourceName

SeatKey = tuple[ResourceName, DeviceId]


@dataclass(frozen=True, slots=True)
class Holder:
    """The container PodResources says holds a seat."""

    namespace: str
    pod: str
    container: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}/{self.container}"

    def document(self) -> HolderDoc:
        return {"namespace": self.namespace, "pod": self.pod, "container": self.container}


HANDOFF_S = 2.0
"""Default hand-off window (config ``handoffWindow``)."""
GONE_CONFIRM_S = 2.0
"""A seen holder must be missing from ``List`` answers this far apart to be gone."""


@dataclass(slots=True)
class Binding:
    """A live binding; it remembers its group and GPUs so it still fences (and shows)
    after a config change removed its seat from the layout.

    ``allocated_at`` is monotonic, of the last Allocate; ``allocated_wall`` the same
    moment on the wall clock, only for the state file's readers."""

    generation: int
    allocated_at: float
    group: str
    gpus: tuple[int, ...]
    holder: Holder | None = None
    allocated_wall: float = 0.0
    handoff: bool = True
    missing_since: float | None = None
    """Monotonic time of the first successful ``List`` that lacked its seen holder."""


@dataclass(slots=True)
class SeatRecord:
    generation: int = 0
    binding: Binding | None = None
    # the binding that ended last, while nothing else bound the seat since: if List
    # shows its holder (or, for one never seen, any holder) again, it was not gone
    released: Binding | None = None


@dataclass(frozen=True, slots=True)
class Bound:
    """What :meth:`Ledger.bind` did: the generation, whether it is a new binding, and
    the live binding it replaced (a new holder after the last one)."""

    generation: int
    is_new: bool
    replaced: Binding | None = None
    previous: int = 0
    """The seat's generation before (what an undo restores)."""


FLOOR_EPOCH = 1_577_836_800
"""2020-01-01T00:00:00Z: generation floors count microseconds from here."""


def floor_after_loss(wall: float) -> int:
    """The generation floor after the ledger was lost: microseconds of wall-clock time
    since 2020. No seat is bound twice within a microsecond, so generations counted
    from 1 (or from an earlier floor) one binding at a time stay below the wall clock's
    microseconds, and every generation after a loss is above every one before it, as
    long as the wall clock at a loss is later than at the last one."""
    return max(0, int((wall - FLOOR_EPOCH) * 1_000_000))


@dataclass(frozen=True)
class Release:
    key: SeatKey
    generation: int
    why: str
    group: str = ""
    gpus: tuple[int, ...] = ()


class Ledger:
    def __init__(
        self,
        release_grace_s: float,
        handoff_s: float = HANDOFF_S,
        gone_confirm_s: float = GONE_CONFIRM_S,
    ) -> None:
        self.release_grace_s = release_grace_s
        self.handoff_s = handoff_s
        self.gone_confirm_s = gone_confirm_s
        self.floor = 0
        """Every new generation is above this (see :func:`floor_after_loss`)."""
        self.released_at: float | None = None
        """When :meth:`reconcile` last ended a binding (monotonic)."""
        self._records: dict[SeatKey, SeatRecord] = {}

    def record(self, key: SeatKey) -> SeatRecord:
        return self._records.get(key) or SeatRecord()

    def binding(self, key: SeatKey) -> Binding | None:
        record = self._records.get(key)
        return record.binding if record is not None else None

    def held(self) -> Iterator[tuple[SeatKey, Binding]]:
        for key, record in self._records.items():
            if record.binding is not None:
                yield key, record.binding

    def watching(self, now: float) -> bool:
        """Whether a PodResources ``List`` could change the ledger now: a binding is
        live (its holder may be gone, or seen for the first time), or one ended within
        ``release_grace_s`` (its holder may show up again: a kubelet that restarts
        answers before its pods are back). With neither (an idle node), ``List`` has
        nothing to end or give back: a seat held that the ledger does not know can only
        follow a lost ledger (rebuilt from the first answers after start) or a
        release (watched for this long)."""
        if next(self.held(), None) is not None:
            return True
        return self.released_at is not None and now - self.released_at <= self.release_grace_s

    def bind(
        self, key: SeatKey, now: float, group: str, gpus: tuple[int, ...], wall: float = 0.0
    ) -> Bound:
        """Bind a seat for a container: the same binding for the init-to-app hand-off,
        else a new one, one generation higher (``now`` is monotonic)."""
        record = self._records.setdefault(key, SeatRecord())
        live = record.binding
        if (
            live is not None
            and live.holder is None
            and live.handoff
            and now - live.allocated_at <= self.handoff_s
        ):
            live.allocated_at = max(live.allocated_at, now)
            live.allocated_wall = max(live.allocated_wall, wall)
            return Bound(live.generation, False)
        previous = record.generation
        record.generation = max(previous, self.floor) + 1
        record.binding = Binding(record.generation, now, group, gpus, allocated_wall=wall)
        record.released = None
        return Bound(record.generation, True, live, previous)

    def answered(self, keys: Iterable[SeatKey], now: float) -> None:
        """New bindings made durable, their answer about to leave (``now``: monotonic):
        their hand-off window starts here."""
        for key in keys:
            binding = self._records[key].binding
            if binding is not None:
                binding.allocated_at = max(binding.allocated_at, now)

    def unbind(self, key: SeatKey, bound: Bound) -> None:
        """Undo a new binding that could not be made durable (nothing was promised yet)."""
        record = self._records[key]
        if record.binding is not None and record.binding.generation == bound.generation:
            record.binding = bound.replaced
            record.generation = bound.previous

    def reconcile(
        self, observed: Mapping[SeatKey, Holder], now: float
    ) -> tuple[list[Release], list[SeatKey], bool]:
        """Apply one successful PodResources ``List`` (``now`` is monotonic).

        Returns the bindings it ended, the seats whose holder it noted anew (or whose
        holder came back), and whether a seen holder is missing but not yet gone (ask
        again after ``gone_confirm_s``).
        """
        releases: list[Release] = []
        seen: list[SeatKey] = []
        pending = False
        for key, record in self._records.items():
            binding = record.binding
            holder = observed.get(key)
            if binding is None:
                back = record.released
                if (
                    holder is not None
                    and back is not None
                    and back.holder in (None, holder)
                    and back.generation == record.generation
                ):
                    back.missing_since = None
                    back.holder, back.handoff = holder, False
                    record.binding, record.released = back, None
                    seen.append(key)
                continue
            if holder is not None:
                binding.missing_since = None
                if binding.holder != holder:
                    binding.holder = holder
                    binding.handoff = False
                    seen.append(key)
                continue
            if binding.holder is not None:
                # gone only on a second answer that lacks it, gone_confirm_s after the first
                since = binding.missing_since
                if since is None:
                    binding.missing_since = now
                if since is None or now - since < self.gone_confirm_s:
                    pending = True
                    continue
                why = f"holder {binding.holder} is gone from PodResources"
            elif now - binding.allocated_at > self.release_grace_s:
                why = (
                    f"never seen in PodResources within {self.release_grace_s:g}s "
                    "of its last Allocate"
                )
            else:
                continue
            record.binding, record.released = None, binding
            releases.append(Release(key, binding.generation, why, binding.group, binding.gpus))
        if releases:
            self.released_at = now
        return releases, seen, pending

    def adopt(
        self,
        key: SeatKey,
        holder: Holder,
        now: float,
        group: str,
        gpus: tuple[int, ...],
        wall: float = 0.0,
    ) -> int:
        """A seat ``List`` shows held that the ledger has no binding for (its state was
        lost): bind it to that holder, one generation above what the ledger knows."""
        record = self._records.setdefault(key, SeatRecord())
        record.generation = max(record.generation, self.floor) + 1
        record.binding = Binding(
            record.generation, now, group, gpus, holder, allocated_wall=wall, handoff=False
        )
        record.released = None
        return record.generation

    # Persistence: the board embeds these per-seat entries in the status-shaped state file.

    def to_entry(self, key: SeatKey) -> LedgerEntry:
        record = self.record(key)
        entry: LedgerEntry = {"generation": record.generation}
        if record.binding is not None:
            b = record.binding
            entry["binding"] = {
                "generation": b.generation,
                "allocatedAt": b.allocated_wall,
                "group": b.group,
                "gpus": list(b.gpus),
                "holder": None if b.holder is None else b.holder.document(),
            }
        return entry

    def highest(self) -> int:
        """The highest generation any seat has had (0: none was ever bound)."""
        return max((record.generation for record in self._records.values()), default=0)

    def keys(self) -> Iterable[SeatKey]:
        return self._records.keys()

    def restore(self, key: SeatKey, entry: LedgerEntry, now: float) -> None:
        """Take one saved entry; a damaged entry never lowers what is already known.

        A restored binding's grace starts at ``now`` (monotonic; saved times are wall
        clock and may have jumped), and it is past its hand-off window.
        """
        generation = int(entry.get("generation", 0))
        raw = entry.get("binding")
        binding = None
        if isinstance(raw, Mapping):
            holder_raw = raw.get("holder")
            holder = (
                Holder(
                    str(holder_raw["namespace"]),
                    str(holder_raw["pod"]),
                    str(holder_raw["container"]),
                )
                if isinstance(holder_raw, Mapping)
                else None
            )
            binding = Binding(
                int(raw["generation"]),
                now,
                str(raw["group"]),
                tuple(int(i) for i in raw["gpus"]),
                holder,
                allocated_wall=float(raw["allocatedAt"]),
                handoff=False,
            )
            generation = max(generation, binding.generation)
        current = self._records.get(key)
        if current is None or generation >= current.generation:
            self._records[key] = SeatRecord(generation, binding)
