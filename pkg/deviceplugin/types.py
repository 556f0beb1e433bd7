"""The product's vocabulary: names, GPUs, links and the discovered topology.

Everything here is plain data (frozen dataclasses, NewTypes); no I/O, no gRPC, no NVML.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NewType

ResourceName = NewType("ResourceName", str)
"""An extended resource, e.g. ``kyb.ai/gpu-2x-seat``."""

DeviceId = NewType("DeviceId", str)
"""One seat as the kubelet counts it, e.g. ``G01-s2``."""

GroupName = NewType("GroupName", str)
"""A stable group name, e.g. ``G01``."""

GROUP_SIZES = (1, 2, 4)
"""The GPUs per group a seat resource can promise: ``kyb.ai/gpu-<size>x-seat``."""
PARTITION_SIZES = (*GROUP_SIZES, 8)
"""The group sizes the topology partition can form (8: a whole NVSwitch board, which
no resource offers yet)."""
SIZE_CHARACTERS = "[" + "".join(str(size) for size in GROUP_SIZES) + "]"
"""A regular expression character class matching one of :data:`GROUP_SIZES`."""

RESOURCE_PATTERN = re.compile(rf"^kyb\.ai/gpu-(?P<size>{SIZE_CHARACTERS})x-seat$")

PlacementPolicy = Literal["spread", "pack"]
"""Which seats GetPreferredAllocation prefers (config ``preferredAllocationPolicy``)."""
DeviceListStrategy = Literal["envvar", "cdi"]
"""How an Allocate answer names the GPUs (config ``deviceListStrategy``)."""
CudaVisibleDevices = Literal["ordinal", "index", "uuid"]
"""How ``CUDA_VISIBLE_DEVICES`` names the container's GPUs (config ``cudaVisibleDevices``;
see ``allocator/response.py``)."""
XidRecovery = Literal["probes", "never"]
"""Whether a GPU comes back by its probes after a critical XID (config ``xidRecovery``)."""


def seat_id(group: GroupName, k: int) -> DeviceId:
    """The device ID of seat ``k`` of ``group``: ``G01`` and 2 -> ``G01-s2``."""
    return DeviceId(f"{group}-s{k}")


def seat_number(device_id: str) -> int:
    """The ``k`` of a :func:`seat_id` (0 for an ID not of that form)."""
    _, _, k = device_id.rpartition("-s")
    return int(k) if k.isdigit() else 0


def group_size_of(resource: ResourceName | str) -> int:
    """The GPUs per group that a resource name promises (``kyb.ai/gpu-4x-seat`` -> 4)."""
    match = RESOURCE_PATTERN.match(resource)
    if match is None:
        raise ValueError(f"not a kyb seat resource: {resource!r}")
    return int(match["size"])


def socket_name_of(resource: ResourceName | str) -> str:
    """The plugin socket of a resource: ``kyb.ai/gpu-2x-seat`` -> ``kyb-gpu-2x-seat.sock``."""
    return f"kyb-gpu-{group_size_of(resource)}x-seat.sock"


class LinkKind(enum.Enum):
    """The ``nvidia-smi topo -m`` connection levels, best first after ``X`` (self)."""

    SELF = "X"
    NVLINK = "NV"
    PIX = "PIX"
    PXB = "PXB"
    PHB = "PHB"
    NODE = "NODE"
    SYS = "SYS"


# Monotone quality: any NVLink beats any PCIe path; more NVLinks beat fewer.
_PCIE_SCORE = {
    LinkKind.PIX: 5,
    LinkKind.PXB: 4,
    LinkKind.PHB: 3,
    LinkKind.NODE: 2,
    LinkKind.SYS: 1,
}
_NVLINK_BASE_SCORE = 100
# Older drivers print SOC for what is now SYS.
_ALIASES = {"SOC": "SYS"}
_NV_WORD = re.compile(r"^NV(?P<count>[1-9][0-9]*)$")


@dataclass(frozen=True)
class Link:
    """How two GPUs are connected, in ``nvidia-smi topo -m`` terms."""

    kind: LinkKind
    nvlinks: int = 0

    def __post_init__(self) -> None:
        if (self.kind is LinkKind.NVLINK) != (self.nvlinks > 0):
            raise ValueError(
                f"NVLink count {self.nvlinks} does not fit link kind {self.kind.value}"
            )

    @classmethod
    def parse(cls, word: str) -> Link:
        """Parse a ``nvidia-smi topo -m`` word (``X``, ``NV12``, ``PIX`` ... ``SYS``)."""
        text = _ALIASES.get(word.strip(), word.strip())
        nv = _NV_WORD.match(text)
        if nv is not None:
            return cls(LinkKind.NVLINK, int(nv["count"]))
        try:
            kind = LinkKind(text)
        except ValueError:
            raise ValueError(
                f"unknown link word {word!r} (expected X, NV<n>, PIX, PXB, PHB, NODE or SYS)"
            ) from None
        if kind is LinkKind.NVLINK:
            raise ValueError(f"link word {word!r} lacks its NVLink count")
        return cls(kind)

    @property
    def word(self) -> str:
        if self.kind is LinkKind.NVLINK:
            return f"NV{self.nvlinks}"
        return str(self.kind.value)

    @property
    def score(self) -> int:
        """Link quality for grouping: higher is better, strictly monotone in the legend order."""
        if self.kind is LinkKind.SELF:
            raise ValueError("a GPU's link to itself has no score")
        if self.kind is LinkKind.NVLINK:
            return _NVLINK_BASE_SCORE + self.nvlinks
        return _PCIE_SCORE[self.kind]

    def __str__(self) -> str:
        return self.word


SELF_LINK = Link(LinkKind.SELF)
SYS_LINK = Link(LinkKind.SYS)


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as discovered."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    pci_bus_id: str
    minor: int
    numa_node: int | None = None

    @property
    def device_path(self) -> str:
        """The character device a container needs, by minor number (not by index)."""
        return f"/dev/nvidia{self.minor}"

    @property
    def bus_order(self) -> tuple[str, int]:
        """Where CUDA's ``PCI_BUS_ID`` order puts this GPU. Discovery and the topology
        file store the canonical NVML spelling (``00000000:07:00.0``, fixed width, upper
        case), so the text sorts as the numbers do."""
        return (self.pci_bus_id.upper(), self.index)


def _pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


@dataclass(frozen=True)
class SetAsideGpu:
    """A GPU discovery found but the plugin does not serve, and why (one line)."""

    index: int
    uuid: str
    why: str


@dataclass(frozen=True)
class Topology:
    """A discovery snapshot: the GPUs (sorted by index) and the link of every pair;
    ``set_aside``: GPUs found but not served (a MIG-enabled GPU)."""

    gpus: tuple[Gpu, ...]
    links: Mapping[tuple[int, int], Link] = field(default_factory=dict)
    set_aside: tuple[SetAsideGpu, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.gpus, key=lambda g: g.index))
        indices = [g.index for g in ordered]
        if len(set(indices)) != len(indices):
            raise ValueError(f"duplicate GPU indices in {indices}")
        normalized = {_pair(a, b): link for (a, b), link in self.links.items() if a != b}
        object.__setattr__(self, "gpus", ordered)
        object.__setattr__(self, "links", MappingProxyType(normalized))

    @classmethod
    def from_matrix(cls, gpus: Iterable[Gpu], matrix: Iterable[Iterable[Link | str]]) -> Topology:
        """Build from a square matrix whose rows and columns follow ``gpus`` in the given order."""
        gpu_list = list(gpus)
        rows = [list(row) for row in matrix]
        if len(rows) != len(gpu_list) or any(len(row) != len(gpu_list) for row in rows):
            raise ValueError(f"link matrix must be {len(gpu_list)}x{len(gpu_list)}")
        links: dict[tuple[int, int], Link] = {}
        for i, row in enumerate(rows):
            for j, cell in enumerate(row):
                link = cell if isinstance(cell, Link) else Link.parse(cell)
                if i == j:
                    if link.kind is not LinkKind.SELF:
                        raise ValueError(f"diagonal cell [{i}][{j}] must be X, got {link.word}")
                    continue
                if link.kind is LinkKind.SELF:
                    raise ValueError(f"cell [{i}][{j}] is X off the diagonal")
                key = _pair(gpu_list[i].index, gpu_list[j].index)
                if key in links and links[key] != link:
                    raise ValueError(
                        f"link matrix is not symmetric at [{i}][{j}]: "
                        f"{links[key].word} vs {link.word}"
                    )
                links[key] = link
        return cls(tuple(gpu_list), links)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    def gpu(self, index: int) -> Gpu:
        for g in self.gpus:
            if g.index == index:
                return g
        raise KeyError(index)

    def link(self, a: int, b: int) -> Link:
        """The link between two GPUs; unknown pairs count as the worst (``SYS``)."""
        if a == b:
            return SELF_LINK
        return self.links.get(_pair(a, b), SYS_LINK)

    def matrix(self) -> list[list[Link]]:
        return [[self.link(a.index, b.index) for b in self.gpus] for a in self.gpus]
