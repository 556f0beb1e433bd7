"""A narrow fake of the ``pynvml`` module, built from a topology file.

It raises pynvml's own ``NVMLError`` subclasses (borrowed from the installed module) so
RealBackend's error handling is exercised as on a real driver, and it reports NVLinks
port by port through :func:`mocklib.nvlink_ports`, as NVML does.
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml
import pytest

from pkg.deviceplugin.nvml import fixtures, mocklib
from pkg.deviceplugin.nvml.topofile import TopologyFile, load_topology_file
from pkg.deviceplugin.types import LinkKind

LEVELS: dict[LinkKind, int] = {
    LinkKind.PIX: pynvml.NVML_TOPOLOGY_SINGLE,
    LinkKind.PXB: pynvml.NVML_TOPOLOGY_MULTIPLE,
    LinkKind.PHB: pynvml.NVML_TOPOLOGY_HOSTBRIDGE,
    LinkKind.NODE: pynvml.NVML_TOPOLOGY_NODE,
    LinkKind.SYS: pynvml.NVML_TOPOLOGY_SYSTEM,
}


@dataclass(frozen=True)
class Handle:
    index: int


@dataclass
class Pci:
    busId: bytes


@dataclass
class Memory:
    total: int


@dataclass
class EventData:
    device: Handle
    eventType: int
    eventData: int


def error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@dataclass
class FakeNvml:
    """Knobs: ``unsupported``/``missing`` function names, ``failing`` function names with
    the NVML error each returns, ``lost`` GPU indices, ``as_bytes`` (pynvml < 11.5
    returned bytes), ``events`` queued for the event set, ``remote_bus`` what every
    NVLink's far end answers as its bus ID (as in a VM), ``spoils_registration`` GPU
    indices whose event registration fails with UNKNOWN, ``gpu_memory_nodes`` the GPU's
    own NUMA node per index where GPUs are NUMA nodes (Grace)."""

    tf: TopologyFile
    unsupported: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    failing: dict[str, int] = field(default_factory=dict)
    spoils_registration: set[int] = field(default_factory=set)
    gpu_memory_nodes: dict[int, int] = field(default_factory=dict)
    recovery_actions: dict[int, int] = field(default_factory=dict)
    mig_modes: dict[int, tuple[int, int]] = field(default_factory=dict)
    mig_monitor: bool = False
    in_set: set[int] = field(default_factory=set)
    remote_bus: str | None = None
    as_bytes: bool = False
    init_error: int | None = None
    events: deque[tuple[int, int, int]] = field(default_factory=deque)
    calls: list[str] = field(default_factory=list)
    inits: int = 0
    shutdowns: int = 0
    freed: int = 0
    registered: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topo = self.tf.topology()
        self.ports = mocklib.nvlink_ports(self.tf)

    # -- the module ------------------------------------------------------------------

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("fake_pynvml")
        for name in dir(pynvml):
            if name.startswith("NVMLError") or name.startswith("NVML_"):
                setattr(mod, name, getattr(pynvml, name))
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(mod, name, self._wrap(name, getattr(self, name)))
        return mod

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            if name in self.missing:
                raise error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            if name in self.unsupported:
                raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if name in self.failing:
                raise error(self.failing[name])
            if name not in ("nvmlInit", "nvmlShutdown") and self.inits <= self.shutdowns:
                raise error(pynvml.NVML_ERROR_UNINITIALIZED)
            for arg in args:
                if isinstance(arg, Handle) and arg.index in self.lost:
                    raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
            return fn(*args)

        return call

    def _s(self, text: str) -> str | bytes:
        return text.encode() if self.as_bytes else text

    # -- NVML calls ------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise error(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.topo.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        if index in self.lost:
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return Handle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Handle:
        # nvml.h: NVML_ERROR_GPU_IS_LOST "if any GPU has fallen off the bus"
        if self.lost:
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        for gpu in self.topo.gpus:
            if gpu.uuid == uuid:
                return self.nvmlDeviceGetHandleByIndex(gpu.index)
        raise error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: Handle) -> str | bytes:
        return self._s(self.topo.gpu(h.index).uuid)

    def nvmlDeviceGetName(self, h: Handle) -> str | bytes:
        return self._s(self.topo.gpu(h.index).name)

    def nvmlDeviceGetMigMode(self, h: Handle) -> list[int]:
        """(current, pending); Not Supported on GPUs without MIG (the default here)."""
        if h.index not in self.mig_modes:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return list(self.mig_modes[h.index])

    def nvmlDeviceGetMemoryInfo(self, h: Handle) -> Memory:
        if self.mig_modes.get(h.index, (0, 0))[0] == 1 and not self.mig_monitor:
            # NVIDIA device plugin issue 399: "Insufficient Permissions" without
            # NVIDIA_MIG_MONITOR_DEVICES=all in the container
            raise error(pynvml.NVML_ERROR_NO_PERMISSION)
        return Memory(self.topo.gpu(h.index).memory_mib << 20)

    def nvmlDeviceGetPciInfo(self, h: Handle) -> Pci:
        return Pci(self.topo.gpu(h.index).pci_bus_id.encode())

    def nvmlDeviceGetMinorNumber(self, h: Handle) -> int:
        return self.topo.gpu(h.index).minor

    def nvmlDeviceGetNumaNodeId(self, h: Handle) -> int:
        # nvml.h: the GPU's own NUMA node, "only ... on platforms where the GPUs are NUMA
        # nodes" (Grace: its memory, no CPU in it); elsewhere Not Supported
        if h.index not in self.gpu_memory_nodes:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.gpu_memory_nodes[h.index]

    def nvmlDeviceGetFieldValues(self, h: Handle, field_ids: list[int]) -> list[Any]:
        """Per field, nvmlReturn and value; only the recovery action is known, and only
        for the GPUs in ``recovery_actions`` (Not Supported elsewhere, as on an older
        driver)."""
        values = []
        for field_id in field_ids:
            value = pynvml.c_nvmlFieldValue_t()
            value.fieldId = field_id
            action = self.recovery_actions.get(h.index)
            if field_id == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION and action is not None:
                value.nvmlReturn = pynvml.NVML_SUCCESS
                value.value.uiVal = action
            else:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            values.append(value)
        return values

    def nvmlDeviceGetMemoryAffinity(self, h: Handle, words: int, scope: int) -> list[int]:
        """The NUMA nodes of the memory nearest the GPU, as a bit set (the fixture's
        ``numaNode``: the CPU-side node)."""
        node = self.topo.gpu(h.index).numa_node
        nodes = [0] * words
        if node is not None:
            nodes[node // 64] |= 1 << (node % 64)
        return nodes

    def nvmlDeviceGetTopologyCommonAncestor(self, a: Handle, b: Handle) -> int:
        link = self.topo.link(a.index, b.index)
        return LEVELS.get(link.kind, LEVELS[LinkKind.SYS])

    def _port(self, h: Handle, link: int) -> mocklib.Port:
        ports = self.ports[h.index]
        if not ports:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= len(ports):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return ports[link]

    def nvmlDeviceGetNvLinkState(self, h: Handle, link: int) -> int:
        self._port(h, link)
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: Handle, link: int) -> Pci:
        bus = self._port(h, link).remote_bus_id if self.remote_bus is None else self.remote_bus
        return Pci(bus.encode())

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h: Handle, link: int) -> int:
        port = self._port(h, link)
        kind: int = (
            pynvml.NVML_NVLINK_DEVICE_TYPE_GPU
            if port.remote == "gpu"
            else pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH
        )
        return kind

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h: Handle, types_: int, event_set: str) -> None:
        assert event_set == "event-set"
        assert types_ == pynvml.nvmlEventTypeXidCriticalError
        if h.index in self.spoils_registration:
            raise error(pynvml.NVML_ERROR_UNKNOWN)  # nvml.h: the set is undefined now
        self.registered.append(h.index)
        self.in_set.add(h.index)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> EventData:
        assert event_set == "event-set"
        if self.events:
            index, event_type, xid = self.events.popleft()
            return EventData(Handle(index), event_type, xid)
        if self.in_set & self.lost:  # nvml.h: GPU_IS_LOST "if a GPU has fallen off the bus"
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        raise error(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.freed += 1
        self.in_set.clear()

    def push_xid(self, index: int, xid: int, event_type: int | None = None) -> None:
        kind = pynvml.nvmlEventTypeXidCriticalError if event_type is None else event_type
        self.events.append((index, kind, xid))


def fake_for(name: str, **knobs: Any) -> FakeNvml:
    return FakeNvml(load_topology_file(fixtures.fixture_path(name)), **knobs)


@pytest.fixture
def make_fake() -> Callable[..., FakeNvml]:
    return fake_for
