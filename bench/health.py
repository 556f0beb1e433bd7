"""Time from a GPU health change to the updated ListAndWatch message.

Measured in process: a :class:`SeatBoard` (with its fsync'd state store) served by the
real :class:`PluginManager` on real Unix sockets, one ListAndWatch stream client per
profile over those sockets, and ``SeatBoard.set_unhealthy`` as the health change (the
health monitor calls that). The time runs from just before ``set_unhealthy`` to the
arrival, at the client, of the first message that shows the change: on every profile
(the figure with the target) and on the first profile.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from dataclasses import dataclass

import grpc

from bench.node import RESOURCES, SEATS_PER_GROUP, BenchError, short_tmpdir, topology_of
from bench.stats import Row, Target, percentile, row
from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.server.manager import PluginManager
from pkg.deviceplugin.types import ResourceName, group_size_of

TARGET = Target("< 100 ms", "value", "<", 100.0)
SECTION = "health change -> ListAndWatch (in-process SeatBoard.set_unhealthy, real sockets)"


@dataclass
class _Message:
    at: float
    unhealthy: int


def _watch(channel: grpc.Channel, out: queue.Queue[_Message], stop: threading.Event) -> None:
    stub = api_pb2_grpc.DevicePluginStub(channel)
    try:
        for reply in stub.ListAndWatch(api_pb2.Empty()):
            now = time.perf_counter()
            out.put(_Message(now, sum(d.health != "Healthy" for d in reply.devices)))
            if stop.is_set():
                return
    except grpc.RpcError:
        if not stop.is_set():
            raise


def run(node_name: str, fixture: str, changes: int) -> list[Row]:
    topology = topology_of(fixture)
    specs = [layout_mod.ProfileSpec(r, group_size_of(r), SEATS_PER_GROUP) for r in RESOURCES]
    root = short_tmpdir("kyb-bench-health-")
    board = SeatBoard(
        layout_mod.build(specs, [], topology),
        Policy(allow_overprovision=True),
        StateStore(root / "state"),
        release_grace_s=3600.0,
    )
    manager = PluginManager(board, root / "dp", None)
    stop = threading.Event()
    channels: list[grpc.Channel] = []
    streams: dict[ResourceName, queue.Queue[_Message]] = {}
    threads: list[threading.Thread] = []
    try:
        manager.sync()
        for resource in RESOURCES:
            channel = grpc.insecure_channel(
                f"unix://{root / 'dp' / f'kyb-gpu-{group_size_of(resource)}x-seat.sock'}"
            )
            channels.append(channel)
            streams[resource] = queue.Queue()
            thread = threading.Thread(
                target=_watch, args=(channel, streams[resource], stop), daemon=True
            )
            thread.start()
            threads.append(thread)
        for resource, stream in streams.items():
            first = stream.get(timeout=10)
            if first.unhealthy:
                raise BenchError(f"{resource} starts with unhealthy seats")
        every: list[float] = []
        first_seen: list[float] = []
        gpus = topology.gpus
        for i in range(changes):
            gpu = gpus[(i // 2) % len(gpus)]
            going_bad = i % 2 == 0
            started = time.perf_counter()
            board.set_unhealthy({gpu.uuid: "benchmark"} if going_bad else {})
            arrivals = []
            for stream in streams.values():
                while True:
                    message = stream.get(timeout=10)
                    if (message.unhealthy > 0) == going_bad:
                        arrivals.append(message.at)
                        break
            every.append((max(arrivals) - started) * 1e3)
            first_seen.append((min(arrivals) - started) * 1e3)
            time.sleep(0.005)
    finally:
        stop.set()
        manager.stop()
        board.close()
        for channel in channels:
            channel.close()
        for thread in threads:
            thread.join(timeout=5)
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for name, samples, target in (
        ("every profile updated", every, TARGET),
        ("first profile updated", first_seen, None),
    ):
        for q in (50, 99):
            rows.append(
                row(
                    SECTION,
                    node_name,
                    f"{name} p{q}",
                    percentile(samples, q),
                    "ms",
                    target=target,
                    samples=len(samples),
                )
            )
    rows.append(
        row(SECTION, node_name, "every profile updated max", max(every), "ms", samples=changes)
    )
    return rows
