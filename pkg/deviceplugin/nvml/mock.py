"""A ``Backend`` served from a mock topology file, with its scripted faults.

Script time starts when the backend is made: a ``lost`` fault hides its GPU from
``discover`` and fails its probes from ``at`` until ``at + recoverAfter`` (forever
without ``recoverAfter``); an ``xid`` fault is reported once by ``wait_xid_events``
when its time has come. Clock and sleep are parameters so tests run the script
without waiting for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pkg.deviceplugin.nvml import fixtures
from pkg.deviceplugin.nvml.backend import NvmlError, Probe, XidEvent
from pkg.deviceplugin.nvml.topofile import (
    RECOVERY_ACTION_CODES,
    Fault,
    TopologyFile,
    load_topology_file,
)
from pkg.deviceplugin.types import Topology


class MockBackend:
    """The GPUs of a :class:`TopologyFile`, as NVML would report them over time."""

    def __init__(
        self,
        topology_file: TopologyFile,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self._file = topology_file
        self._topology = topology_file.topology()
        self._by_uuid = {g.uuid: g.index for g in self._topology.gpus}
        self._clock = clock
        self._closed = threading.Event()
        # The default sleep is the close event's wait, so close() wakes a blocked waiter.
        self._sleep = sleep if sleep is not None else self._closed.wait
        self._started = clock()
        self._lock = threading.Lock()
        self._lost = [f for f in topology_file.faults if f.kind == "lost"]
        self._pending_xids = sorted(
            (f for f in topology_file.faults if f.kind == "xid"), key=lambda f: f.at
        )

    @classmethod
    def from_name_or_path(
        cls,
        name_or_path: str | Path,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> MockBackend:
        """A built-in fixture name (``dgx-a100``) or a topology file path."""
        return cls(load_topology_file(fixtures.resolve(name_or_path)), clock=clock, sleep=sleep)

    @property
    def topology_file(self) -> TopologyFile:
        return self._file

    def _elapsed(self) -> float:
        return self._clock() - self._started

    def _lost_now(self, elapsed: float) -> set[int]:
        return {f.gpu for f in self._lost if _is_lost(f, elapsed)}

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise NvmlError("the NVML mock backend is closed")

    def discover(self) -> Topology:
        self._check_open()
        lost = self._lost_now(self._elapsed())
        if not lost:
            return self._topology
        return Topology(
            tuple(g for g in self._topology.gpus if g.index not in lost),
            {pair: link for pair, link in self._topology.links.items() if not set(pair) & lost},
        )

    def probe(self, uuid: str) -> Probe:
        self._check_open()
        index = self._by_uuid.get(uuid)
        if index is None:
            return Probe(uuid, ok=False, reason=f"no GPU with UUID {uuid}")
        elapsed = self._elapsed()
        if index in self._lost_now(elapsed):
            return Probe(uuid, ok=False, reason=f"GPU {index} is lost (fell off the bus)")
        return Probe(uuid, ok=True, recovery_action=self._recovery_action(index, elapsed))

    def _recovery_action(self, index: int, elapsed: float) -> int | None:
        """The recovery action field after the GPU's last XID so far that sets one."""
        scripted = [
            f
            for f in self._file.faults
            if f.kind == "xid" and f.gpu == index and f.at <= elapsed and f.recovery_action
        ]
        if not scripted:
            return None
        last = max(scripted, key=lambda f: f.at)
        return RECOVERY_ACTION_CODES[last.recovery_action or "none"]

    def wait_xid_events(self, timeout_s: float) -> list[XidEvent]:
        deadline = self._clock() + max(timeout_s, 0.0)
        while True:
            with self._lock:
                elapsed = self._elapsed()
                due = [f for f in self._pending_xids if f.at <= elapsed]
                self._pending_xids = self._pending_xids[len(due) :]
                next_at = self._pending_xids[0].at if self._pending_xids else None
            if due:
                # Fault guarantees an xid number on kind xid; "or 0" only narrows the type.
                return [XidEvent(self._topology.gpu(f.gpu).uuid, f.xid or 0) for f in due]
            remaining = deadline - self._clock()
            if remaining <= 0 or self._closed.is_set():
                return []
            if next_at is not None:
                remaining = min(remaining, max(next_at - self._elapsed(), 0.0))
            self._sleep(remaining)

    def close(self) -> None:
        self._closed.set()


def _is_lost(fault: Fault, elapsed: float) -> bool:
    if elapsed < fault.at:
        return False
    recovers_at = fault.recovers_at
    return recovers_at is None or elapsed < recovers_at
