"""Registration against a kubelet that behaves like the real device manager.

The real manager dials the plugin back inside ``Register``, refuses a second
``Register`` for a socket it holds (and forgets the live connection as it does), and
never reconnects a lost ``ListAndWatch`` stream. The plugin manager runs here in
process with the real seat board and gRPC servers on real Unix sockets; the kubelet
simulator mirrors those behaviours (its own tests pin them).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import pytest

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import R1, R2, seed_layout
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.kubeletsim.simulator import KubeletSimulator
from pkg.deviceplugin.server import liveness, registration
from pkg.deviceplugin.server.dirwatch import DirWatch
from pkg.deviceplugin.server.manager import PluginManager
from pkg.deviceplugin.server.plugin import MAX_STREAMS
from pkg.deviceplugin.types import socket_name_of

RESOURCES = (R1, R2)


def count_ticks(manager: PluginManager) -> list[float]:
    """When each tick of the manager's watch loop runs, from now on."""
    ticks: list[float] = []
    real_tick = manager.tick

    def counting_tick() -> None:
        ticks.append(time.monotonic())
        real_tick()

    manager.tick = counting_tick  # type: ignore[method-assign]
    manager.wake()  # the loop picks up the counting tick
    return ticks


@dataclass
class Node:
    root: Path
    kubelet: KubeletSimulator
    board: SeatBoard
    manager: PluginManager | None = None
    stop: threading.Event | None = None
    loop: threading.Thread | None = None

    def start(self, register_timeout_s: float = registration.TIMEOUT_S) -> PluginManager:
        self.manager = PluginManager(
            self.board,
            self.root / "dp",
            None,
            register_timeout_s=register_timeout_s,
            dev_root=self.root / "devroot",
        )
        self.manager.sync()
        self.stop = threading.Event()
        self.loop = threading.Thread(target=self.manager.run, args=(self.stop,), daemon=True)
        self.loop.start()
        return self.manager

    def shutdown(self) -> None:
        if self.manager is None:
            return
        assert self.stop is not None and self.loop is not None
        self.stop.set()
        self.manager.wake()
        self.loop.join(5)
        assert not self.loop.is_alive()
        self.manager.wait_idle(15)
        self.manager.stop()
        self.manager = None

    def registered(self, resource: str, times: int = 1) -> bool:
        endpoint = self.kubelet.endpoints.get(resource)
        return (
            endpoint is not None
            and endpoint.connected
            and endpoint.registrations >= times
            and len(self.kubelet.healthy(resource)) == len(endpoint.devices) > 0
        )

    def wait_registered(self, times: int = 1, timeout_s: float = 10.0) -> bool:
        return self.kubelet.wait_for(
            lambda: all(self.registered(r, times) for r in RESOURCES), timeout_s
        )

    def calls(self, resource: str) -> int:
        return self.kubelet.register_calls.count(resource)


class MakeNode(Protocol):
    def __call__(self, *, register_reply_delay_s: float = 0.0) -> Node: ...


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    made: list[Node] = []

    def make(*, register_reply_delay_s: float = 0.0) -> Node:
        root = Path(tempfile.mkdtemp(prefix="kyb-mgr-", dir="/tmp"))
        kubelet = KubeletSimulator(
            root / "dp", root / "pr" / "kubelet.sock", register_reply_delay_s=register_reply_delay_s
        )
        kubelet.start()
        board = SeatBoard(
            seed_layout(),
            Policy(allow_overprovision=True),
            StateStore(root / "state"),
            release_grace_s=60.0,
        )
        node = Node(root, kubelet, board)
        made.append(node)
        return node

    yield make
    for node in made:
        node.shutdown()
        node.kubelet.stop()
        shutil.rmtree(node.root, ignore_errors=True)


def test_profiles_register_in_parallel_and_each_exactly_once(make_node: MakeNode) -> None:
    node = make_node(register_reply_delay_s=1.5)
    node.start()
    assert node.wait_registered(timeout_s=10)
    # Both Registers were with the slow kubelet at the same time: one slow profile
    # does not hold up the next.
    assert node.kubelet.max_registers_in_flight == len(RESOURCES)
    assert node.manager is not None and node.manager.wait_idle(5)
    assert all(node.calls(r) == 1 for r in RESOURCES), node.kubelet.register_calls


def test_a_register_answer_later_than_the_deadline_counts_once_the_kubelet_dialed_back(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    # The kubelet connects at once but answers after the plugin gave up waiting.
    node = make_node(register_reply_delay_s=1.5)
    caplog.set_level(logging.INFO, logger="pkg.deviceplugin.server.profile")
    manager = node.start(register_timeout_s=0.5)
    assert node.wait_registered()
    assert manager.wait_idle(5)
    node.kubelet.wait_for(lambda: node.kubelet.registers_in_flight == 0, 5)
    # No second Register: it would have been refused ("already connected") and the
    # kubelet would have lost track of the plugin.
    assert all(node.calls(r) == 1 for r in RESOURCES), node.kubelet.register_errors
    assert not any("already connected" in e for e in node.kubelet.register_errors)
    assert manager.registered() == dict.fromkeys(RESOURCES, True)
    assert "dialed back" in caplog.text
    # The kubelet still tracks the plugin: stopping it marks every seat Unhealthy.
    node.shutdown()
    assert node.kubelet.wait_for(lambda: all(node.kubelet.healthy(r) == [] for r in RESOURCES), 5)


def test_an_already_connected_answer_counts_as_registered_and_is_not_retried(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node()
    manager = PluginManager(node.board, node.root / "dp", None)
    node.manager = manager
    manager.sync()
    # Someone registered the 1x socket before the loop ran (a previous incarnation's
    # late Register, say): the kubelet holds it.
    registration.register(node.root / "dp" / "kubelet.sock", R1, socket_name_of(R1))
    caplog.set_level(logging.INFO, logger="pkg.deviceplugin.server.profile")
    node.stop = threading.Event()
    node.loop = threading.Thread(target=manager.run, args=(node.stop,), daemon=True)
    node.loop.start()
    assert node.wait_registered()
    assert manager.wait_idle(5)
    assert node.kubelet.wait_for(lambda: manager.registered()[R1], 5)
    node.stop.wait(1.0)  # ten more ticks of the watch loop
    assert node.calls(R1) == 2 and node.calls(R2) == 1, node.kubelet.register_calls
    assert "already" in caplog.text


def test_a_stream_the_kubelet_dropped_makes_the_profile_register_again(make_node: MakeNode) -> None:
    node = make_node()
    node.start()
    assert node.wait_registered()
    node.kubelet.disconnect(R2)
    assert node.kubelet.wait_for(lambda: node.kubelet.healthy(R2) == [], 5)
    # The kubelet does not reconnect; the plugin notices and registers again.
    assert node.kubelet.wait_for(lambda: node.registered(R2, times=2), 10)
    assert node.kubelet.endpoints[R1].registrations == 1
    assert node.calls(R2) == 2


def test_a_kubelet_restart_is_followed_by_one_register_per_profile(make_node: MakeNode) -> None:
    node = make_node()
    node.start()
    assert node.wait_registered()
    node.kubelet.restart()
    assert node.wait_registered(times=2)
    assert node.manager is not None and node.manager.wait_idle(5)
    assert all(node.calls(r) == 2 for r in RESOURCES), node.kubelet.register_calls
    assert not node.kubelet.register_errors


def test_a_wiped_socket_is_served_again_and_its_registration_counts_as_again(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node()
    caplog.set_level(logging.INFO, logger="pkg.deviceplugin.server.profile")
    node.start()
    assert node.wait_registered()
    node.kubelet.restart()  # wipes the plugin's sockets too
    assert node.wait_registered(times=2)
    assert node.manager is not None and node.manager.wait_idle(5)
    firsts = [r for r in caplog.records if "first time" in r.getMessage()]
    agains = [r for r in caplog.records if "(#2)" in r.getMessage()]
    assert len(firsts) == len(RESOURCES) and len(agains) == len(RESOURCES), caplog.text


def test_allocate_still_answers_while_two_more_streams_hold_workers(make_node: MakeNode) -> None:
    # Each ListAndWatch stream holds one of the server's SERVER_WORKERS threads for its
    # life. Across a kubelet restart an old and a new stream overlap; with a third
    # watcher on top, Allocate (and the liveness probe) must still get a thread.
    node = make_node()
    node.start()
    assert node.wait_registered()
    socket = node.root / "dp" / socket_name_of(R1)
    channels = [grpc.insecure_channel(f"unix://{socket}") for _ in range(2)]
    try:
        streams = [
            iter(api_pb2_grpc.DevicePluginStub(c).ListAndWatch(api_pb2.Empty())) for c in channels
        ]
        for stream in streams:
            next(stream)  # each holds a worker now
        stub = api_pb2_grpc.DevicePluginStub(channels[0])
        reply = stub.Allocate(
            api_pb2.AllocateRequest(
                container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["G0-s0"])]
            ),
            timeout=5,
        )
        assert reply.container_responses[0].envs["KYB_GPU_SEAT"] == "G0-s0"
        options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
        assert options.get_preferred_allocation_available
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.parametrize("extra", [3, 12])
def test_any_number_of_streams_never_wedges_the_unary_calls_and_the_kubelet_gets_back(
    make_node: MakeNode, extra: int
) -> None:
    """Issue 18: the kubelet's stream plus three more filled the four workers; options,
    GetPreferredAllocation and the liveness check hit their deadlines until the extra
    streams went. Now a profile keeps at most MAX_STREAMS open, the newest pushing out
    the oldest, and the plugin registers again when the kubelet's was pushed out."""
    node = make_node()
    manager = node.start()
    assert node.wait_registered()
    socket = node.root / "dp" / socket_name_of(R1)
    channels = [grpc.insecure_channel(f"unix://{socket}") for _ in range(extra)]
    reader = futures.ThreadPoolExecutor(1)
    try:
        streams = []
        for channel in channels:
            stream = iter(api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty()))
            # Answered: the stream holds a worker now (a wedged server never answers).
            reader.submit(next, stream).result(timeout=5)
            streams.append(stream)
        stub = api_pb2_grpc.DevicePluginStub(channels[-1])
        options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=2)
        assert options.get_preferred_allocation_available
        preferred = stub.GetPreferredAllocation(
            api_pb2.PreferredAllocationRequest(
                container_requests=[
                    api_pb2.ContainerPreferredAllocationRequest(
                        available_deviceIDs=["G0-s0", "G1-s0"], allocation_size=1
                    )
                ]
            ),
            timeout=2,
        )
        assert len(preferred.container_responses[0].deviceIDs) == 1
        assert liveness.check(node.root / "dp", RESOURCES, timeout_s=2.0) == []
        # The oldest streams (the kubelet's first) were ended, the newest kept.
        servicer = manager._served[R1].servicer
        assert servicer.streams_active <= MAX_STREAMS
        for stream in streams[:-MAX_STREAMS]:
            with pytest.raises(StopIteration):
                next(stream)
        # The kubelet lost its stream and does not reconnect: the plugin registers
        # again, and the kubelet's new stream pushes out one of ours.
        assert node.kubelet.wait_for(lambda: node.registered(R1, times=2), 10.0)
        assert node.calls(R2) == 1  # the other profile was not touched
    finally:
        for channel in channels:
            channel.close()
        reader.shutdown(wait=False, cancel_futures=True)


def test_an_idle_registered_manager_does_not_tick_and_still_sees_a_kubelet_restart_at_once(
    make_node: MakeNode,
) -> None:
    """Issue 18: the loop ran every 100 ms whatever happened (a quarter of an idle
    plugin's CPU). It now sleeps until the kubelet directory changes, a stream opens
    or ends, or one of its timers is due."""
    node = make_node()
    manager = node.start()
    assert node.wait_registered()
    ticks = count_ticks(manager)
    time.sleep(1.5)
    assert len(ticks) <= 2, f"{len(ticks)} ticks in 1.5 s idle"
    before = len(ticks)
    restarted = time.monotonic()
    node.kubelet.restart()
    assert node.wait_registered(times=2, timeout_s=2.0)
    assert len(ticks) > before and ticks[before] - restarted < 0.05, ticks[before:]


def test_a_manager_waiting_for_the_kubelet_sleeps_and_registers_when_it_comes(
    make_node: MakeNode,
) -> None:
    """Before kubelet.sock appeared, the loop had a timer due at once and ticked tens of
    thousands of times a second; it now sleeps until the directory changes."""
    node = make_node()
    node.kubelet.stop()
    (node.root / "dp" / "kubelet.sock").unlink(missing_ok=True)
    manager = node.start()
    ticks = count_ticks(manager)
    time.sleep(1.0)
    assert len(ticks) <= 3, f"{len(ticks)} ticks in 1 s with no kubelet"
    node.kubelet.start()
    assert node.wait_registered(timeout_s=2.0)


# ---- the watch loop's wake-ups (DirWatch) ---------------------------------------------
# A restarted kubelet re-admits its running pods about 70 ms after serving kubelet.sock
# and kills a pod whose init container holds a seat of a profile not registered by then
# (conformance/kubelet/README.md, "Kubelet restarts"): the loop must not sleep through
# the kubelet's socket appearing.


def _wait_returns_within(watch: DirWatch, change: Callable[[], object], limit_s: float) -> bool:
    """True when ``watch.wait`` (given 5 s) returned within ``limit_s`` of ``change``."""
    woke: list[float] = []

    def waiter() -> None:
        watch.wait(5.0)
        woke.append(time.monotonic())

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)  # the waiter is blocked
    changed = time.monotonic()
    change()
    thread.join(6)
    return bool(woke) and woke[0] - changed < limit_s


@pytest.mark.parametrize("event", ["create", "delete", "rename"])
def test_the_watch_wakes_when_an_entry_of_the_kubelet_dir_changes(
    tmp_path: Path, event: str
) -> None:
    (tmp_path / "old.sock").touch()
    actions = {
        "create": lambda: (tmp_path / "kubelet.sock").touch(),
        "delete": lambda: (tmp_path / "old.sock").unlink(),
        "rename": lambda: (tmp_path / "old.sock").rename(tmp_path / "kubelet.sock"),
    }
    with DirWatch(tmp_path) as watch:
        watch.wait(0)  # arms the watch
        assert watch.watching
        assert _wait_returns_within(watch, actions[event], 1.0)


def test_the_watch_follows_a_kubelet_dir_that_is_created_late_or_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "device-plugins"
    with DirWatch(directory) as watch:
        assert not watch.wait(0.05) and not watch.watching  # absent: it only sleeps
        directory.mkdir()
        watch.wait(0)
        assert watch.watching
        assert _wait_returns_within(watch, lambda: shutil.rmtree(directory), 1.0)
        watch.wait(0)
        assert not watch.watching
        directory.mkdir()
        watch.wait(0)
        assert watch.watching
        assert _wait_returns_within(watch, lambda: (directory / "kubelet.sock").touch(), 1.0)


def test_an_idle_watch_sleeps_its_whole_timeout(tmp_path: Path) -> None:
    with DirWatch(tmp_path) as watch:
        assert watch.wait(0.3)  # the first wait arms the watch and says "look again"
        started = time.monotonic()
        assert not watch.wait(0.3)
        assert time.monotonic() - started >= 0.25
