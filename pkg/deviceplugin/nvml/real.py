"""A ``Backend`` over NVML through a ``pynvml`` module handed in by the composition root.

Drivers differ in what they answer: old ones lack whole functions, GPUs without NVLink
answer NotSupported, containers may hide sysfs. Every such query degrades to the next
best source (logged at debug level); only errors that leave discovery meaningless
(no NVML, no device count, no UUID) become :class:`NvmlError`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from pkg.deviceplugin.nvml.backend import NvmlError, Probe, XidEvent
from pkg.deviceplugin.nvml.topofile import normalize_pci_bus_id
from pkg.deviceplugin.types import Gpu, Link, LinkKind, SetAsideGpu, Topology

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIB = 1 << 20
# pynvml's NVML_NVLINK_MAX_LINKS has grown with each GPU generation (6, 12, 18, 36);
# walk what the installed module says, or the newest count known here.
_DEFAULT_MAX_LINKS = 36
# A wait returns the first event; more that are already queued are collected with
# zero-timeout waits, up to this many, so one call reports a burst.
_MAX_EVENTS_PER_WAIT = 64

# nvmlGpuTopologyLevel_t values (stable since NVML 4): INTERNAL, SINGLE, MULTIPLE,
# HOSTBRIDGE, NODE (formerly CPU), SYSTEM.
_ANCESTOR_LINKS = {
    0: LinkKind.PIX,
    10: LinkKind.PIX,
    20: LinkKind.PXB,
    30: LinkKind.PHB,
    40: LinkKind.NODE,
    50: LinkKind.SYS,
}
_XID_CRITICAL_ERROR = 0x8  # nvmlEventTypeXidCriticalError
_REMOTE_GPU, _REMOTE_SWITCH = 0x00, 0x02  # nvmlNvLinkDeviceType_t
_NVML_ERROR_UNKNOWN = 999
_FI_DEV_GET_GPU_RECOVERY_ACTION = 230  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
_DEVICE_MIG_ENABLE = 1  # NVML_DEVICE_MIG_ENABLE (current mode, nvmlDeviceGetMigMode)
_AFFINITY_SCOPE_NODE = 0  # nvmlAffinityScope_t: NVML_AFFINITY_SCOPE_NODE
_NODE_SET_WORDS = 4  # 64-bit words of a NUMA node set: nodes 0 to 255


class _Unsupported(Exception):
    """The driver cannot answer this query on this GPU; try the next source."""


class _SetAside(Exception):
    """A GPU that answers but is not to be served whole (MIG enabled)."""

    def __init__(self, gpu: SetAsideGpu) -> None:
        super().__init__(gpu.why)
        self.gpu = gpu


@dataclass
class _Device:
    gpu: Gpu
    handle: object


class RealBackend:
    """GPU facts from NVML. ``nvml`` is the ``pynvml`` module (or a fake of it)."""

    def __init__(
        self,
        nvml: ModuleType,
        sysfs_root: Path = Path("/sys"),
        smi_links: Callable[[], Mapping[tuple[int, int], Link]] | None = None,
    ) -> None:
        """``smi_links`` (``nvidia-smi topo -m``, parsed) fills in the pairs whose PCIe
        level NVML cannot give; without it, or when it fails, NUMA nodes decide."""
        self._nvml: Any = nvml
        self._smi_links = smi_links
        self._smi_failure: str | None = None
        self._error: type[Exception] = nvml.NVMLError
        self._sysfs_root = sysfs_root
        self._lock = threading.Lock()
        self._initialized = False
        self._failing: dict[int, str] = {}
        self._problems: list[str] = []
        self._set_aside: list[SetAsideGpu] = []
        # Each GPU's NVML index by UUID, as discovery last found it (a GPU lost since keeps
        # its entry: NVML indices hold while the driver is loaded).
        self._index_of: dict[str, int] = {}
        self._closed = threading.Event()
        # Waiting holds the events lock so that close() never frees a set in use.
        self._events_lock = threading.Lock()
        self._event_set: object | None = None
        self._events_supported = True
        # GPUs not registered for XID events yet (index -> why the last try failed, ""
        # before the first) and how many GPUs are registered; see _ensure_event_set.
        self._unwatched: dict[int, str] = {}
        self._watched = 0
        self._watched_handles: dict[object, int] = {}  # _handle_key -> index
        # GPUs whose registration spoiled a set (index -> why), and a failed wait not yet
        # reported because events came before it in the same call
        self._spoiled_registration: dict[int, str] = {}
        self._wait_failure: NvmlError | None = None
        self._unsupported_errors = tuple(
            cls
            for cls in (
                getattr(nvml, "NVMLError_NotSupported", None),
                getattr(nvml, "NVMLError_FunctionNotFound", None),
            )
            if isinstance(cls, type)
        )
        self._max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", _DEFAULT_MAX_LINKS))

    # -- plumbing -------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """Call NVML; any NVML error becomes NvmlError naming what was asked."""
        try:
            return fn(*args)
        except self._error as exc:
            if isinstance(exc, self._unsupported_errors):
                raise _Unsupported(f"{what}: {exc}") from exc
            raise NvmlError(f"NVML {what}: {exc}") from exc

    def _optional(self, what: str, fn: Callable[..., T], *args: object) -> T | None:
        """Call NVML where the driver may not support the query: None if it does not."""
        try:
            return self._call(what, fn, *args)
        except _Unsupported as exc:
            log.debug("NVML cannot answer, falling back: %s", exc)
            return None

    def _required(self, what: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return self._call(what, fn, *args)
        except _Unsupported as exc:
            raise NvmlError(f"NVML {exc}") from exc

    def _ensure_init(self) -> None:
        with self._lock:
            if self._closed.is_set():
                raise NvmlError("the NVML backend is closed")
            if not self._initialized:
                self._required("init", self._nvml.nvmlInit)
                self._initialized = True

    # -- discovery ------------------------------------------------------------------

    def discover(self) -> Topology:
        self._ensure_init()
        nvml = self._nvml
        count = self._required("device count", nvml.nvmlDeviceGetCount)
        devices = self._devices(count)
        gpu_by_bus = {d.gpu.pci_bus_id: d.gpu.index for d in devices}
        direct: dict[tuple[int, int], int] = {}
        to_switch: dict[int, int] = {}
        # What NVML could not tell (documented NVML_ERROR_UNKNOWN, a far end it cannot
        # name): those pairs degrade to nvidia-smi, then the NUMA guess; one warning.
        problems: list[str] = []
        unidentified: set[int] = set()  # GPUs with an active NVLink to an unknown far end
        for d in devices:
            for remote_index, is_switch in self._nvlinks(d, gpu_by_bus, problems):
                if remote_index is None and not is_switch:
                    unidentified.add(d.gpu.index)
                elif is_switch:
                    to_switch[d.gpu.index] = to_switch.get(d.gpu.index, 0) + 1
                elif remote_index is not None and remote_index != d.gpu.index:
                    pair = (d.gpu.index, remote_index)
                    direct[pair] = direct.get(pair, 0) + 1
        links: dict[tuple[int, int], Link] = {}
        unanswered: list[tuple[int, int]] = []
        for i, a in enumerate(devices):
            for b in devices[i + 1 :]:
                ia, ib = a.gpu.index, b.gpu.index
                # Each end counts the same cable; take the larger in case one end's
                # query failed. Through NVSwitches every GPU reaches every other with
                # the links it has to the switches, as nvidia-smi prints (NV12 on DGX A100).
                nvlinks = max(direct.get((ia, ib), 0), direct.get((ib, ia), 0))
                if ia in to_switch and ib in to_switch:
                    nvlinks += min(to_switch[ia], to_switch[ib])
                if nvlinks:
                    links[ia, ib] = Link(LinkKind.NVLINK, nvlinks)
                    continue
                pcie = self._pcie_link(a, b, problems)
                if pcie is None or ia in unidentified or ib in unidentified:
                    unanswered.append((ia, ib))  # an NVLink NVML cannot place may join them
                if pcie is None:
                    pcie = self._numa_guess(a, b)
                links[ia, ib] = pcie
        if unanswered:
            links.update(self._from_smi(unanswered))
        self._report_problems(problems)
        with self._lock:
            set_aside = tuple(self._set_aside)
        return Topology(tuple(d.gpu for d in devices), links, set_aside)

    def _report_problems(self, problems: list[str]) -> None:
        """One warning when what NVML could not tell changed since the last discovery."""
        with self._lock:
            changed = problems != self._problems
            self._problems = problems
        if changed and problems:
            shown = "; ".join(problems[:4]) + (
                f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
            )
            log.warning(
                "NVML could not place every GPU pair (%s); those pairs take nvidia-smi topo "
                "-m, else the NUMA nodes",
                shown,
            )

    def _from_smi(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], Link]:
        """The ``nvidia-smi topo -m`` words for pairs NVML could not place."""
        if self._smi_links is None:
            return {}
        try:
            matrix = self._smi_links()
        except Exception as exc:  # SmiError, or anything the runner raises
            message = str(exc)
            if message != self._smi_failure:
                log.warning(
                    "nvidia-smi topo -m fallback failed (%s); guessing links from NUMA nodes",
                    message,
                )
                self._smi_failure = message
            return {}
        self._smi_failure = None
        return {pair: matrix[pair] for pair in pairs if pair in matrix}

    def _devices(self, count: int) -> list[_Device]:
        """Every GPU that answers; one that errors (fell off the bus) is left out, as it
        would be from a fresh enumeration, and the health checks take it from there."""
        devices: list[_Device] = []
        failing: dict[int, str] = {}
        set_aside: list[SetAsideGpu] = []
        for index in range(count):
            try:
                devices.append(self._device(index))
            except NvmlError as exc:
                failing[index] = str(exc)
            except _SetAside as aside:
                set_aside.append(aside.gpu)
        with self._lock:
            changed = failing.keys() != self._failing.keys()
            self._failing = failing
            self._index_of.update((d.gpu.uuid, d.gpu.index) for d in devices)
            aside_changed = set_aside != self._set_aside
            self._set_aside = set_aside
        if changed:
            for index, reason in failing.items():
                log.warning("leaving GPU %d out of discovery: %s", index, reason)
        if aside_changed:
            for gpu in set_aside:
                log.warning(
                    "GPU %d (%s) is not served: %s",
                    gpu.index,
                    gpu.uuid,
                    gpu.why,
                    extra={"gpu": gpu.index},
                )
        return devices

    def _device(self, index: int) -> _Device:
        nvml = self._nvml
        what = f"GPU {index}"
        handle = self._required(f"{what} handle", nvml.nvmlDeviceGetHandleByIndex, index)
        pci = self._required(f"{what} PCI info", nvml.nvmlDeviceGetPciInfo, handle)
        try:
            bus_id = normalize_pci_bus_id(_text(pci.busId))
        except ValueError as exc:
            raise NvmlError(f"NVML {what}: {exc}") from exc
        uuid = _text(self._required(f"{what} UUID", nvml.nvmlDeviceGetUUID, handle))
        # Before memory info: on a MIG-enabled GPU that needs privileges the DaemonSet
        # does not have (NVIDIA_MIG_MONITOR_DEVICES), and would hide the GPU silently.
        if self._mig_enabled(what, handle):
            raise _SetAside(
                SetAsideGpu(
                    index,
                    uuid,
                    "MIG is enabled: its instances are not whole GPUs, and this plugin hands "
                    f"out whole GPUs (nvidia-smi -i {index} -mig 0, then a GPU reset, to serve it)",
                )
            )
        memory = self._required(f"{what} memory info", nvml.nvmlDeviceGetMemoryInfo, handle)
        gpu = Gpu(
            index=index,
            uuid=uuid,
            name=_text(self._required(f"{what} name", nvml.nvmlDeviceGetName, handle)),
            memory_mib=int(memory.total) // _MIB,
            pci_bus_id=bus_id,
            minor=int(
                self._required(f"{what} minor number", nvml.nvmlDeviceGetMinorNumber, handle)
            ),
            numa_node=self._numa_node(what, handle, bus_id),
        )
        return _Device(gpu, handle)

    def _mig_enabled(self, what: str, handle: object) -> bool:
        query = getattr(self._nvml, "nvmlDeviceGetMigMode", None)
        if query is None:
            return False
        try:
            mode = self._optional(f"{what} MIG mode", query, handle)  # Not Supported: no MIG
        except NvmlError as exc:  # the queries after it tell whether the GPU answers
            log.debug("%s", exc)
            return False
        return mode is not None and int(mode[0]) == _DEVICE_MIG_ENABLE

    def _numa_node(self, what: str, handle: object, bus_id: str) -> int | None:
        """The CPU-side NUMA node of the GPU, what the kubelet aligns CPUs and memory to:
        the PCI device's ``numa_node`` in sysfs (as NVIDIA's plugin reads it), else the
        one node NVML names as nearest memory. Never ``nvmlDeviceGetNumaNodeId``: that is
        the GPU's own memory node, on platforms where GPUs are NUMA nodes (GH200, GB200),
        and no CPU is in it."""
        node = self._sysfs_numa_node(bus_id)
        if node is None or node < 0:
            node = self._nearest_memory_node(what, handle)
        return None if node is None or node < 0 else int(node)

    def _nearest_memory_node(self, what: str, handle: object) -> int | None:
        query = getattr(self._nvml, "nvmlDeviceGetMemoryAffinity", None)
        if query is None:
            return None
        try:
            words = self._optional(
                f"{what} memory affinity", query, handle, _NODE_SET_WORDS, _AFFINITY_SCOPE_NODE
            )
        except NvmlError as exc:
            log.debug("%s", exc)
            return None
        if words is None:
            return None
        nodes = [
            i * 64 + bit
            for i, word in enumerate(words)
            for bit in range(64)
            if int(word) >> bit & 1
        ]
        return nodes[0] if len(nodes) == 1 else None

    def _sysfs_numa_node(self, bus_id: str) -> int | None:
        # sysfs spells the domain with at least four lower-case digits (0000:07:00.0).
        domain, rest = bus_id.split(":", 1)
        name = f"{int(domain, 16):04x}:{rest.lower()}"
        path = self._sysfs_root / "bus" / "pci" / "devices" / name / "numa_node"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            log.debug("no NUMA node for %s from %s: %s", bus_id, path, exc)
            return None

    def _nvlinks(
        self, device: _Device, gpu_by_bus: dict[str, int], problems: list[str]
    ) -> list[tuple[int | None, bool]]:
        """Each active NVLink of ``device``: (remote GPU index or None, remote is a
        switch); (None, False) for a far end NVML cannot name (noted in ``problems``)."""
        nvml = self._nvml
        what = f"GPU {device.gpu.index} NVLink"
        found: list[tuple[int | None, bool]] = []
        for link in range(self._max_links):
            try:
                active = self._call(
                    f"{what} {link} state", nvml.nvmlDeviceGetNvLinkState, device.handle, link
                )
            except (_Unsupported, NvmlError) as exc:
                # No NVLink at all, or no link with this number on this GPU
                # (older drivers answer InvalidArgument past the last link).
                log.debug("%s", exc)
                continue
            if not active:
                continue
            try:
                pci = self._optional(
                    f"{what} {link} remote PCI info",
                    nvml.nvmlDeviceGetNvLinkRemotePciInfo,
                    device.handle,
                    link,
                )
                if pci is None:
                    continue
                remote_bus = normalize_pci_bus_id(_text(pci.busId))
            except (NvmlError, ValueError) as exc:
                # NVML_ERROR_UNKNOWN is documented here; a VM may show a bus ID of nothing
                problems.append(
                    f"{what} {link}: far end unknown ({str(exc).removeprefix('NVML ')})"
                )
                found.append((None, False))
                continue
            remote_index = gpu_by_bus.get(remote_bus)
            type_query = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
            remote_type = (
                self._optional(f"{what} {link} remote type", type_query, device.handle, link)
                if type_query is not None
                else None
            )
            if remote_type is None:
                # Old drivers cannot say; the far end of a GPU link is a GPU we enumerated.
                found.append((remote_index, remote_index is None))
            elif remote_type == _REMOTE_GPU:
                if remote_index is None:  # a GPU, but none of ours has that bus ID (VMs)
                    problems.append(f"{what} {link}: far end {remote_bus} is no GPU here")
                found.append((remote_index, False))
            elif remote_type == _REMOTE_SWITCH:
                found.append((None, True))
        return found

    def _pcie_link(self, a: _Device, b: _Device, problems: list[str]) -> Link | None:
        try:
            level = self._optional(
                f"GPUs {a.gpu.index} and {b.gpu.index} common ancestor",
                self._nvml.nvmlDeviceGetTopologyCommonAncestor,
                a.handle,
                b.handle,
            )
        except NvmlError as exc:  # NVML_ERROR_UNKNOWN: "error in underlying topology discovery"
            problems.append(str(exc).removeprefix("NVML "))
            return None
        if level is None:
            return None
        return Link(_ANCESTOR_LINKS.get(int(level), LinkKind.SYS))

    @staticmethod
    def _numa_guess(a: _Device, b: _Device) -> Link:
        # Without the PCIe answer, the NUMA nodes still tell same socket from across.
        same_node = a.gpu.numa_node is not None and a.gpu.numa_node == b.gpu.numa_node
        return Link(LinkKind.NODE if same_node else LinkKind.SYS)

    # -- health -----------------------------------------------------------------------

    def probe(self, uuid: str) -> Probe:
        nvml = self._nvml
        try:
            self._ensure_init()
            handle = self._handle_of(uuid)
            self._optional("memory info", nvml.nvmlDeviceGetMemoryInfo, handle)
        except (NvmlError, _Unsupported) as exc:
            if self._closed.is_set():
                raise
            return Probe(uuid, ok=False, reason=str(exc).removeprefix("NVML "))
        return Probe(uuid, ok=True, recovery_action=self._recovery_action(handle))

    def _recovery_action(self, handle: object) -> int | None:
        """The driver's verdict on what the GPU needs (None: it cannot say)."""
        query = getattr(self._nvml, "nvmlDeviceGetFieldValues", None)
        if query is None:
            return None
        try:
            values = self._optional(
                "recovery action", query, handle, [_FI_DEV_GET_GPU_RECOVERY_ACTION]
            )
        except NvmlError as exc:
            log.debug("%s", exc)
            return None
        if not values or int(values[0].nvmlReturn) != 0:
            return None  # per field: Not Supported on drivers without it
        return int(values[0].value.uiVal)

    def _handle_of(self, uuid: str) -> object:
        """The handle of the GPU with ``uuid``, looked up by index and checked by UUID.

        Not ``nvmlDeviceGetHandleByUUID``: it fails with GPU_IS_LOST for every GPU while
        any one has fallen off the bus (nvml.h), so one lost GPU would fail them all.
        """
        nvml = self._nvml
        with self._lock:
            known = self._index_of.get(uuid)
        candidates = [known] if known is not None else []
        count = self._required("device count", nvml.nvmlDeviceGetCount)
        candidates += [index for index in range(count) if index != known]
        silent: list[str] = []
        for index in candidates:
            try:
                handle = self._required(
                    f"GPU {index} handle", nvml.nvmlDeviceGetHandleByIndex, index
                )
                found = _text(self._required(f"GPU {index} UUID", nvml.nvmlDeviceGetUUID, handle))
            except NvmlError as exc:
                if index == known:
                    raise  # the GPU that had this UUID does not answer: that is the verdict
                silent.append(str(exc).removeprefix("NVML "))
                continue
            if found == uuid:
                with self._lock:
                    self._index_of[uuid] = index
                return handle
        why = "".join(f"; {reason}" for reason in silent)
        raise NvmlError(f"NVML lookup: no GPU with UUID {uuid} answers{why}")

    def wait_xid_events(self, timeout_s: float) -> list[XidEvent]:
        """Critical XIDs, waited for up to ``timeout_s``. A wait that fails (NVML says
        GPU_IS_LOST when a GPU falls off the bus) raises: events may have been missed.
        The event set is then rebuilt by the next call, with the GPUs that answer."""
        with self._events_lock:
            if self._wait_failure is not None:  # after the events that came before it
                failure, self._wait_failure = self._wait_failure, None
                raise failure
            event_set = self._ensure_event_set()
            if event_set is None:
                # Nothing can ever arrive; block anyway so callers' loops do not spin.
                self._closed.wait(timeout_s)
                return []
            events: list[XidEvent] = []
            timeout_ms = max(int(timeout_s * 1000), 0)
            while len(events) < _MAX_EVENTS_PER_WAIT:
                try:
                    data = self._wait_one(event_set, timeout_ms)
                except NvmlError as exc:
                    self._drop_event_set()
                    self._spoiled_registration.clear()  # the next set tries every GPU
                    if not events:
                        raise
                    self._wait_failure = exc
                    break
                if data is None:
                    break
                if int(data.eventType) & _XID_CRITICAL_ERROR:
                    events.append(XidEvent(self._event_uuid(data.device), int(data.eventData)))
                timeout_ms = 0
            return events

    def _wait_one(self, event_set: object, timeout_ms: int) -> Any | None:
        nvml = self._nvml
        try:
            return nvml.nvmlEventSetWait_v2(event_set, timeout_ms)
        except self._error as exc:
            if isinstance(exc, getattr(nvml, "NVMLError_Timeout", ())):
                return None
            raise NvmlError(f"NVML event wait: {exc}") from exc

    def _event_uuid(self, handle: object) -> str:
        """The UUID of an event's GPU: asked of NVML, else (a GPU that just fell off the
        bus answers nothing) known from the handle it was registered with; "" when
        neither tells (the monitor then suspects every GPU, see ``XidEvent``)."""
        try:
            return _text(self._nvml.nvmlDeviceGetUUID(handle))
        except self._error as exc:
            index = self._watched_handles.get(_handle_key(handle))
            with self._lock:
                uuid = next((u for u, i in self._index_of.items() if i == index), "")
            log.debug("no UUID from NVML for an XID event's GPU (%s); by its handle: %r", exc, uuid)
            return uuid

    def _ensure_event_set(self) -> object | None:
        """The event set, with every GPU that answers registered for critical XIDs.

        A GPU that does not answer now (fell off the bus) must not blind the others: it
        is left out and registered by a later wait once it answers.
        """
        if not self._events_supported:
            return None
        while True:
            if self._event_set is None:
                self._ensure_init()
                nvml = self._nvml
                event_set: object | None = self._optional("event set", nvml.nvmlEventSetCreate)
                if event_set is None:
                    self._without_events()
                    return None
                try:
                    count = self._required("device count", nvml.nvmlDeviceGetCount)
                except NvmlError:
                    self._free(event_set)
                    raise
                self._event_set = event_set
                self._unwatched = {
                    i: "" for i in range(count) if i not in self._spoiled_registration
                }
            if self._unwatched:
                if self._watch_unwatched(self._event_set):
                    self._drop_event_set()  # undefined now (nvml.h): a new one, without it
                    continue
                if not self._watched and not self._unwatched and not self._spoiled_registration:
                    self._without_events()
                    return None
            return self._event_set

    def _drop_event_set(self) -> None:
        if self._event_set is not None:
            self._free(self._event_set)
        self._event_set = None
        self._unwatched = {}
        self._watched = 0
        self._watched_handles.clear()

    def _watch_unwatched(self, event_set: object) -> bool:
        """Register the GPUs not watched yet; True when a registration failed with
        NVML_ERROR_UNKNOWN, after which nvml.h says the set is undefined: that GPU is left
        out of the sets built until the next failed wait."""
        nvml = self._nvml
        for index, failing in sorted(self._unwatched.items()):
            try:
                handle = self._required(
                    f"GPU {index} handle", nvml.nvmlDeviceGetHandleByIndex, index
                )
                self._call(
                    f"GPU {index} XID event registration",
                    nvml.nvmlDeviceRegisterEvents,
                    handle,
                    _XID_CRITICAL_ERROR,
                    event_set,
                )
            except _Unsupported as exc:
                log.debug("%s", exc)
                del self._unwatched[index]
                continue
            except NvmlError as exc:
                if _code(exc) == _NVML_ERROR_UNKNOWN:
                    log.warning(
                        "registering GPU %d for XID events left the event set undefined "
                        "(%s); building a new one without it (its probes still watch it)",
                        index,
                        exc,
                        extra={"gpu": index},
                    )
                    self._spoiled_registration[index] = str(exc)
                    return True
                if str(exc) != failing:
                    log.warning(
                        "XID events of GPU %d are not watched until it answers: %s",
                        index,
                        exc,
                        extra={"gpu": index},
                    )
                    self._unwatched[index] = str(exc)
                continue
            del self._unwatched[index]
            self._watched += 1
            self._watched_handles[_handle_key(handle)] = index
            if failing:
                log.info(
                    "watching XID events of GPU %d now that it answers", index, extra={"gpu": index}
                )
        return False

    def _without_events(self) -> None:
        log.info("NVML reports no XID events on this node: health relies on probes")
        self._events_supported = False
        if self._event_set is not None:
            self._free(self._event_set)
            self._event_set = None

    def _free(self, event_set: object) -> None:
        try:
            self._nvml.nvmlEventSetFree(event_set)
        except self._error as exc:
            log.debug("NVML event set free: %s", exc)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._events_lock:
            if self._event_set is not None:
                self._free(self._event_set)
                self._event_set = None
        with self._lock:
            if self._initialized:
                self._initialized = False
                try:
                    self._nvml.nvmlShutdown()
                except self._error as exc:
                    log.debug("NVML shutdown: %s", exc)


def _text(value: object) -> str:
    """pynvml returns bytes from structs (and from every call in old releases)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _handle_key(handle: object) -> object:
    """What identifies a device handle: the address a ctypes ``nvmlDevice_t`` points to
    (NVML hands out one per device; pynvml wraps it in a new object each time), or the
    handle itself where it is not a pointer."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value  # type: ignore[arg-type]
    except (TypeError, ctypes.ArgumentError):
        return handle


def _code(exc: NvmlError) -> int | None:
    """The NVML return code behind an :class:`NvmlError` (pynvml's ``NVMLError.value``)."""
    value = getattr(exc.__cause__, "value", None)
    return value if isinstance(value, int) else None
