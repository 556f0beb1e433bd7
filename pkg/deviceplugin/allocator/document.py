"""The seat documents, typed once: the status (SPEC section 9), the state file (the
status with each seat's ledger entry, the retired seats' entries and the time), and
the state file as :meth:`StateStore.load` gives it back, checked and cut down to what
the ledger reads. Keys are the documents' own (camelCase, as people read them)."""

# No `from __future__ import annotations`: TypedDict reads NotRequired from the real
# annotations (`__required_keys__`), which the tests compare with the documents.
from typing import Literal, NotRequired, TypedDict


class HolderDoc(TypedDict):
    namespace: str
    pod: str
    container: str


class BindingDoc(TypedDict):
    generation: int
    allocatedAt: float
    """Wall clock, for people; the ledger's rules measure monotonic time."""
    group: str
    gpus: list[int]
    holder: HolderDoc | None


class LedgerEntry(TypedDict):
    """One seat's ledger entry: its generation, and its binding while one is live."""

    generation: int
    binding: NotRequired[BindingDoc | None]


class SeatDoc(TypedDict):
    state: Literal["free", "held", "fenced", "drained", "unhealthy"]
    generation: int
    why: NotRequired[str]
    holder: NotRequired[HolderDoc]
    """The status only: who holds the seat, once PodResources has shown it."""
    binding: NotRequired[BindingDoc | None]
    """The state file only."""


class GroupDoc(TypedDict):
    gpus: list[int]
    uuids: list[str]
    health: Literal["Healthy", "Unhealthy"]
    numaNodes: list[int]
    fenced: bool
    drained: bool
    drainedWhy: NotRequired[str]
    """Where drained: the config's reason (the group's name in drain, a GPU in drainGpus)."""
    seats: dict[str, SeatDoc]
    links: NotRequired[dict[str, str]]
    """``plan`` only: the link between each pair of the group's GPUs."""


class ResourceDoc(TypedDict):
    groups: dict[str, GroupDoc]


class SetAsideDoc(TypedDict):
    index: int
    uuid: str
    why: str


class GroupSpecDoc(TypedDict):
    name: str
    gpus: list[int]
    seatsPerGroup: NotRequired[int]


class OverrideDoc(TypedDict, total=False):
    """A node's entry under the config's ``nodes``: the keys it sets, as written."""

    drain: list[str]
    drainGpus: list[int | str]
    seatsPerGroup: dict[str, int]
    groups: list[GroupSpecDoc]


class NodeDoc(TypedDict):
    node: NotRequired[str]
    """The node the plugin runs on (``--node-name``, ``KYB_NODE_NAME``), where known."""
    override: NotRequired[OverrideDoc]
    """The config's override for that node (``nodes.<node>``), where it has one."""


class StatusDoc(NodeDoc):
    resources: dict[str, ResourceDoc]
    setAsideGpus: NotRequired[list[SetAsideDoc]]


class LoadedGroup(TypedDict):
    seats: dict[str, LedgerEntry]


class LoadedResource(TypedDict):
    groups: dict[str, LoadedGroup]


class LoadedState(TypedDict):
    version: int
    resources: dict[str, LoadedResource]
    retired: dict[str, dict[str, LedgerEntry]]
    generationFloor: int
    awaitingList: bool
    """A lost ledger was not yet rebuilt from PodResources when this was written."""
    cleanStop: bool
    """Written only by the save at a clean stop: without it, the journal may have lost
    lines."""
