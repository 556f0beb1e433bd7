"""Helpers that turn a mock topology file into what NVML itself would report.

A topology file speaks ``nvidia-smi topo -m`` (``NV12``); NVML speaks NVLink ports
(link ``k`` of GPU ``a`` is active and ends at PCI device ``x``). :func:`nvlink_ports`
makes up the ports that would make ``nvidia-smi`` print the file's words, so that every
NVML-level mock (the fake module in the tests, the C library here) answers alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Literal

from pkg.deviceplugin.nvml.topofile import TopologyFile
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
