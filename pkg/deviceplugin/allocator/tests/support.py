from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from pkg.deviceplugin.allocator import layout, response
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import Holder, SeatKey
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.types import DeviceId, Gpu, GroupName, ResourceName, Topology


def model_examples(default: int) -> int:
    """How many runs a model-based or fuzz test makes: ``default`` where the suite runs
    on the default topology (plain ``pytest``, tox's ``unit`` and topo-dgx-a100); a tenth
    of it with another topology selected, since these tests do not read it; more for a
    long hunt (``KYB_MODEL_EXAMPLES=2000``)."""
    if "KYB_MODEL_EXAMPLES" in os.environ:
        return int(os.environ["KYB_MODEL_EXAMPLES"])
    if os.environ.get("KYB_TEST_TOPOLOGY", "dgx-a100") != "dgx-a100":
        return max(5, default // 10)
    return default


R1 = ResourceName("kyb.ai/gpu-1x-seat")
R2 = ResourceName("kyb.ai/gpu-2x-seat")


def four_gpus_in_nvlink_pairs() -> Topology:
    gpus = [
        Gpu(
            i,
            f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
            "NVIDIA A100-SXM4-40GB",
            40960,
            f"00000000:0{i + 1}:00.0",
            minor=10 + i,
            numa_node=i // 2,
        )
        for i in range(4)
    ]
    matrix = [
        ["X", "NV4", "SYS", "SYS"],
        ["NV4", "X", "SYS", "SYS"],
        ["SYS", "SYS", "X", "NV4"],
        ["SYS", "SYS", "NV4", "X"],
    ]
    return Topology.from_matrix(gpus, matrix)


R4 = ResourceName("kyb.ai/gpu-4x-seat")


def three_profiles(seats_2x: int = 3, seats_g01: int | None = None) -> layout.Layout:
    """1x, 2x and 4x profiles on four GPUs in NVLink pairs (G01 and G23, G0123);
    ``seats_g01``: G01's own seat count, in place of the 2x profile's."""
    return layout.build(
        [
            layout.ProfileSpec(R1, 1, 4),
            layout.ProfileSpec(R2, 2, seats_2x),
            layout.ProfileSpec(R4, 4, 2),
        ],
        [
            layout.GroupSpec(GroupName("G01"), (0, 1), seats_g01),
            layout.GroupSpec(GroupName("G23"), (2, 3)),
            layout.GroupSpec(GroupName("G0123"), (0, 1, 2, 3)),
        ],
        four_gpus_in_nvlink_pairs(),
    )


def seed_layout(topology: Topology | None = None) -> layout.Layout:
    """The seed's example: 1x seats 4 per group, 2x seats 3 per group, G01 and G23 explicit."""
    return layout.build(
        [layout.ProfileSpec(R1, 1, 4), layout.ProfileSpec(R2, 2, 3)],
        [layout.GroupSpec(GroupName("G01"), (0, 1)), layout.GroupSpec(GroupName("G23"), (2, 3))],
        topology or four_gpus_in_nvlink_pairs(),
    )


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


MakeBoard = Callable[..., SeatBoard]


@pytest.fixture
def clock() -> Clock:
    return Clock()


class WritesBehind:
    """Stands in for the state file writer thread: the writes the board queues behind
    its journal lines wait here until a test lets them ``land``, or a crash drops them."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def __call__(self, write: Callable[[], None]) -> None:
        self.pending.append(write)

    def land(self) -> None:
        pending, self.pending = self.pending, []
        for write in pending:
            write()

    def drop(self) -> None:
        self.pending.clear()


@pytest.fixture
def writes() -> WritesBehind:
    return WritesBehind()


@pytest.fixture
def make_board(tmp_path: Path, clock: Clock, writes: WritesBehind) -> MakeBoard:
    def make(
        policy: Policy | None = None,
        lay: layout.Layout | None = None,
        grace: float = 60.0,
    ) -> SeatBoard:
        return SeatBoard(
            lay or seed_layout(),
            policy or Policy(),
            StateStore(tmp_path / "state"),
            release_grace_s=grace,
            clock=clock,
            monotonic=clock,
            write_behind=writes,
        )

    return make


NO_DEV = Path("/nonexistent/dev-root")
"""A ``/dev`` with none of the optional device nodes."""


def allocate(
    board: SeatBoard,
    resource: ResourceName,
    requests: Sequence[Sequence[str]],
    observed: Mapping[SeatKey, Holder] | None = None,
    *,
    dev_root: Path = NO_DEV,
) -> list[response.ContainerAllocation]:
    """Allocate, and what the server answers for it (``server/plugin.py``)."""
    ids = [[DeviceId(device_id) for device_id in container] for container in requests]
    bound = board.allocate(resource, ids, observed)
    return response.build_all(resource, bound, board.policy, dev_root)
