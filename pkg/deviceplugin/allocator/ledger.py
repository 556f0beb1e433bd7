"""The seat ledger: per seat its highest generation and its live binding, if any.

Rules (SPEC section 4):
- An Allocate of a seat with a live binding is the same binding (same generation): the
  kubelet re-sends the same IDs when an init container's devices pass to the next
  container of the pod.
- An Allocate of a seat without a live binding starts a new one, one generation higher.
  Generations never go back and are never reused, whatever happens to the layout.
- A binding ends only on evidence: its holder was seen in PodResources ``List`` and is
  gone now, or it was never seen there within ``release_grace_s`` of its last Allocate.

The ledger is not thread-safe; its owner (the seat board) holds the lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass(slots=True)
class Binding:
    """A live binding; it remembers its group and GPUs so it still fences (and shows)
    after a config change removed its seat from the layout."""

    generation: int
    allocated_at: float
    group: str
    gpus: tuple[int, ...]
    holder: Holder | None = None


@dataclass(slots=True)
class SeatRecord:
    generation: int = 0
    binding: Binding | None = None


@dataclass(frozen=True)
class Release:
    key: SeatKey
    generation: int
    why: str
    group: str = ""
    gpus: tuple[int, ...] = ()


class Ledger:
    def __init__(self, release_grace_s: float) -> None:
        self.release_grace_s = release_grace_s
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

    def bind(self, key: SeatKey, now: float, group: str, gpus: tuple[int, ...]) -> tuple[int, bool]:
        """Bind a seat (or confirm its live binding); returns (generation, is_new)."""
        record = self._records.setdefault(key, SeatRecord())
        if record.binding is not None:
            record.binding.allocated_at = max(record.binding.allocated_at, now)
            return record.binding.generation, False
        record.generation += 1
        record.binding = Binding(record.generation, now, group, gpus)
        return record.generation, True

    def unbind(self, key: SeatKey, generation: int) -> None:
        """Undo a new binding that could not be made durable (nothing was promised yet)."""
        record = self._records[key]
        if record.binding is not None and record.binding.generation == generation:
            record.binding = None
            record.generation = generation - 1

    def reconcile(
        self, observed: Mapping[SeatKey, Holder], now: float
    ) -> tuple[list[Release], list[SeatKey]]:
        """Apply one PodResources ``List``: note holders, end bindings with evidence.

        Returns the bindings it ended and the seats whose holder it noted anew.
        """
        releases: list[Release] = []
        seen: list[SeatKey] = []
        for key, record in self._records.items():
            binding = record.binding
            if binding is None:
                continue
            holder = observed.get(key)
            if holder is not None:
                if binding.holder != holder:
                    binding.holder = holder
                    seen.append(key)
                continue
            if binding.holder is not None:
                why = f"holder {binding.holder} is gone from PodResources"
            elif now - binding.allocated_at > self.release_grace_s:
                why = (
                    f"never seen in PodResources within {self.release_grace_s:g}s "
                    "of its last Allocate"
                )
            else:
                continue
            record.binding = None
            releases.append(Release(key, binding.generation, why, binding.group, binding.gpus))
        return releases, seen

    # Persistence: the board embeds these per-seat entries in the status-shaped state file.

    def to_entry(self, key: SeatKey) -> dict[str, Any]:
        record = self.record(key)
        entry: dict[str, Any] = {"generation": record.generation}
        if record.binding is not None:
            b = record.binding
            entry["binding"] = {
                "generation": b.generation,
                "allocatedAt": b.allocated_at,
                "group": b.group,
                "gpus": list(b.gpus),
                "holder": None
                if b.holder is None
                else {
                    "namespace": b.holder.namespace,
                    "pod": b.holder.pod,
                    "container": b.holder.container,
                },
            }
        return entry

    def keys(self) -> Iterable[SeatKey]:
        return self._records.keys()

    def restore(self, key: SeatKey, entry: Mapping[str, Any]) -> None:
        """Take one saved entry; a damaged entry never lowers what is already known."""
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
                float(raw["allocatedAt"]),
                str(raw["group"]),
                tuple(int(i) for i in raw["gpus"]),
                holder,
            )
            generation = max(generation, binding.generation)
        current = self._records.get(key)
        if current is None or generation >= current.generation:
            self._records[key] = SeatRecord(generation, binding)
