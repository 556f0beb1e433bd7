"""Helpers that turn a mock topology file into what NVML itself would report.

A topology file speaks ``nvidia-smi topo -m`` (``NV12``); NVML speaks NVLink ports
(link ``k`` of GPU ``a`` is active and ends at PCI device ``x``). :func:`nvlink_ports`
makes up the ports that would make ``nvidia-smi`` print the file's words, so that every
NVML-level mock (the fake module in the tests, the C library here) answers alike.

The C library (``nvml_mock.c``) is built with the system compiler by :func:`build`, fed
by :func:`write_data`, and put under ``pynvml`` by :func:`install`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pkg.deviceplugin.nvml.topofile import RECOVERY_ACTION_CODES, TopologyFile
from pkg.deviceplugin.types import LinkKind

# NVSwitches appear on the PCI bus of the host; a domain no fixture uses keeps their
# made-up bus ids apart from the GPUs'.
_SWITCHES = 6


def switch_bus_id(k: int) -> str:
    return f"0000FFFF:{k:02X}:00.0"


@dataclass(frozen=True)
class Port:
    """One active NVLink of a GPU and what is at its far end."""

    remote_bus_id: str
    remote: Literal["gpu", "switch"]


def nvlink_ports(tf: TopologyFile) -> dict[int, list[Port]]:
    """Per GPU index, its active NVLinks.

    Three or more GPUs that all see each other with the same ``NV<n>`` are taken to hang
    off NVSwitches (``n`` links each, spread over the switches), as on DGX A100/H100 and
    DGX-2; every other ``NV<n>`` is ``n`` direct GPU-to-GPU links, as on DGX-1 or with
    NVLink bridges.
    """
    topo = tf.topology()
    nv = {pair: link.nvlinks for pair, link in topo.links.items() if link.kind is LinkKind.NVLINK}
    members = sorted({i for pair in nv for i in pair})
    counts = {nv.get(pair, 0) for pair in combinations(members, 2)}
    ports: dict[int, list[Port]] = {g.index: [] for g in topo.gpus}
    if len(members) >= 3 and len(counts) == 1 and 0 not in counts:
        (n,) = counts
        for i in members:
            ports[i] = [Port(switch_bus_id(k % _SWITCHES), "switch") for k in range(n)]
        return ports
    for (a, b), n in sorted(nv.items()):
        ports[a] += [Port(topo.gpu(b).pci_bus_id, "gpu")] * n
        ports[b] += [Port(topo.gpu(a).pci_bus_id, "gpu")] * n
    return ports


# -- the C mock library ------------------------------------------------------------------

ENV_VAR = "KYB_NVML_MOCK_TOPOLOGY"
"""The C library reads the flat file this names at ``nvmlInit``."""

SOURCE = Path(__file__).with_name("nvml_mock.c")

# nvmlGpuTopologyLevel_t for the PCIe words; an NVLink pair's PCIe path is not in the
# file and RealBackend never asks for it, so it reads as SYSTEM.
_LEVELS = {
    LinkKind.PIX: 10,
    LinkKind.PXB: 20,
    LinkKind.PHB: 30,
    LinkKind.NODE: 40,
    LinkKind.SYS: 50,
}
_REMOTE_TYPES = {"gpu": 0x00, "switch": 0x02}


def _ms(seconds: float | None, scale: float) -> int:
    return -1 if seconds is None else round(seconds * scale * 1000)


def write_data(tf: TopologyFile, path: Path, time_scale: float = 1.0) -> Path:
    """Flatten ``tf`` into the C library's line format (see nvml_mock.c).

    ``time_scale`` stretches or shrinks the fault script so tests need not wait for it.
    """
    topo = tf.topology()
    lost = {f.gpu: f for f in tf.faults if f.kind == "lost"}
    lines: list[str] = []
    for g in topo.gpus:
        fault = lost.get(g.index)
        lost_at = _ms(fault.at if fault else None, time_scale)
        back_at = _ms(fault.recovers_at if fault else None, time_scale)
        numa = -1 if g.numa_node is None else g.numa_node
        lines.append(
            f"gpu {g.minor} {numa} {g.memory_mib} {g.pci_bus_id} {g.uuid} "
            f"{lost_at} {back_at} {g.name}"
        )
    for position, a in enumerate(topo.gpus):
        for b in topo.gpus[position + 1 :]:
            level = _LEVELS.get(topo.link(a.index, b.index).kind, 50)
            lines.append(f"level {a.index} {b.index} {level}")
    for index, ports in nvlink_ports(tf).items():
        lines += [f"port {index} {_REMOTE_TYPES[p.remote]} {p.remote_bus_id}" for p in ports]
    for f in tf.faults:
        if f.kind == "xid":
            action = -1 if f.recovery_action is None else RECOVERY_ACTION_CODES[f.recovery_action]
            lines.append(f"xid {f.gpu} {_ms(f.at, time_scale)} {f.xid} {action}")
    path.write_text("\n".join(lines) + "\n")
    return path


def build(out_dir: Path, cc: str | None = None) -> Path:
    """Compile the mock into ``out_dir/libnvidia-ml.so.1`` with the system C compiler."""
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or "cc"
    lib = out_dir / "libnvidia-ml.so.1"
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(lib), str(SOURCE)]
    result = subprocess.run([*cmd, "-lpthread"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the NVML mock failed: {result.stderr.strip()}")
    return lib


def install(pynvml: Any, lib: Path) -> None:
    """Make ``pynvml`` use ``lib`` instead of finding libnvidia-ml.so.1 itself.

    pynvml loads its library once into the module global ``nvmlLib`` and caches every
    function pointer by name, so both are replaced.
    """
    pynvml.nvmlLib = ctypes.CDLL(str(lib))
    pynvml._nvmlGetFunctionPointer_cache.clear()
