"""One profile's server, tick by tick, on a fake clock.

Each test drives a real ``ProfileServer`` (its gRPC server on a real Unix socket) by
calling ``tick`` itself, with the time on a fake clock, against the kubelet simulator
(which behaves like the real device manager: ``server/tests/test_manager.py``) or a
``kubelet.sock`` nobody listens on (a kubelet that died and left its socket).
"""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import R1, R2, Clock, seed_layout
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.kubeletsim.simulator import KubeletSimulator
from pkg.deviceplugin.server import registration
from pkg.deviceplugin.server.manager import SERVER_WORKERS
from pkg.deviceplugin.server.profile import (
    FIRST_BACKOFF_S,
    NO_STREAM_S,
    STREAM_LOST_S,
    ProfileServer,
    State,
    inode,
)
from pkg.deviceplugin.server.tests.support import short_dir, target, wait_until
from pkg.deviceplugin.types import ResourceName


class Node:
    """A kubelet directory, a seat board, the fake clock, and what to clean up."""

    def __init__(self) -> None:
        self.root = short_dir("kyb-prof-")
        self.kubelet_dir = self.root / "dp"
        self.kubelet_socket = self.kubelet_dir / registration.KUBELET_SOCKET
        self.clock = Clock()
        self.board = SeatBoard(
            seed_layout(),
            Policy(allow_overprovision=True),
            StateStore(self.root / "state"),
            release_grace_s=60.0,
        )
        self.kubelets: list[KubeletSimulator] = []
        self.profiles: list[ProfileServer] = []

    def kubelet(self, register_reply_delay_s: float = 0.0) -> KubeletSimulator:
        kubelet = KubeletSimulator(
            self.kubelet_dir,
            self.root / "pr" / "kubelet.sock",
            register_reply_delay_s=register_reply_delay_s,
        )
        kubelet.start()
        self.kubelets.append(kubelet)
        return kubelet

    def dead_kubelet_socket(self) -> None:
        """A ``kubelet.sock`` nobody listens on, with an inode the last one did not have
        (made beside it, then renamed over it)."""
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        beside = self.kubelet_dir / "kubelet.sock.new"
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(beside))
        beside.rename(self.kubelet_socket)

    def profile(self, resource: ResourceName, register_timeout_s: float = 5.0) -> ProfileServer:
        profile = ProfileServer(
            resource,
            self.board,
            None,
            self.kubelet_dir,
            workers=SERVER_WORKERS,
            clock=self.clock,
            register_timeout_s=register_timeout_s,
            dev_root=self.root / "devroot",
        )
        self.profiles.append(profile)
        return profile

    def step(self, profile: ProfileServer) -> None:
        """One tick, and the Register it started (if any) to its end."""
        profile.tick(inode(self.kubelet_socket))
        assert profile.join(15)

    def close(self) -> None:
        for profile in self.profiles:
            profile.join(15)
            profile.stop()
        for kubelet in self.kubelets:
            kubelet.stop()
        self.board.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def node() -> Iterator[Node]:
    made = Node()
    yield made
    made.close()


def answers(path: Path) -> bool:
    """Whether a device-plugin server answers on ``path``."""
    with grpc.insecure_channel(target(path)) as channel:
        options = api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
            api_pb2.Empty(), timeout=5
        )
    return options.get_preferred_allocation_available


def state_of(profile: ProfileServer) -> State:
    """The profile's state now. A call, not ``profile.state`` in each check: the state
    moves with every tick and on the Register thread, which mypy's narrowing of
    ``profile.state`` after one check cannot know."""
    return profile.state


def kubelet_has(kubelet: KubeletSimulator, resource: str, registrations: int) -> bool:
    endpoint = kubelet.endpoints.get(resource)
    return (
        endpoint is not None
        and endpoint.connected
        and endpoint.registrations == registrations
        and len(kubelet.healthy(resource)) == len(endpoint.devices) > 0
    )


def test_a_profile_serves_then_registers_and_then_has_nothing_to_do(node: Node) -> None:
    kubelet = node.kubelet(register_reply_delay_s=0.5)
    profile = node.profile(R1)
    assert state_of(profile) is State.SERVING and answers(profile.path)
    profile.tick(inode(node.kubelet_socket))
    assert state_of(profile) is State.REGISTERING  # the kubelet holds its answer back
    assert profile.join(5)
    assert state_of(profile) is State.REGISTERED and profile.registered
    assert kubelet.wait_for(lambda: kubelet_has(kubelet, R1, 1), 5)
    assert wait_until(lambda: len(profile.servicer.counts().open_streams) == 1)
    # The kubelet's stream is open: no timer is due, however long it stays so.
    assert profile.due() is None
    node.clock.now += NO_STREAM_S + STREAM_LOST_S + 60
    node.step(profile)
    assert state_of(profile) is State.REGISTERED
    assert kubelet.register_calls == [R1]


def test_register_failures_back_off_doubling_to_the_most_and_a_new_kubelet_sock_starts_over(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pkg.deviceplugin.server.profile")
    node.dead_kubelet_socket()
    profile = node.profile(R1)
    waits = []
    for _ in range(8):
        node.step(profile)  # a Register, refused: nothing listens
        assert state_of(profile) is State.SERVING and not profile.registered
        due = profile.due()
        assert due is not None
        waits.append(round(due - node.clock.now, 3))
        node.clock.now = due - 0.001
        node.step(profile)  # too early: no Register (a refused one would move the time)
        assert profile.due() == due
        node.clock.now = due
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    # The same refusal each time: said once.
    assert caplog.text.count("registration with the kubelet failed") == 1, caplog.text
    # A new kubelet.sock: a Register at once, well before the next retry was due, and
    # its refusal waits the first backoff again.
    node.dead_kubelet_socket()
    node.step(profile)
    assert profile.due() == node.clock.now + FIRST_BACKOFF_S


def test_a_stream_the_kubelet_dropped_makes_the_profile_register_again_after_stream_lost_s(
    node: Node,
) -> None:
    kubelet = node.kubelet()
    profile = node.profile(R2)
    node.step(profile)
    assert state_of(profile) is State.REGISTERED
    assert wait_until(lambda: len(profile.servicer.counts().open_streams) == 1)
    kubelet.disconnect(R2)  # the kubelet does not reconnect
    assert wait_until(lambda: not profile.servicer.counts().open_streams)
    node.step(profile)  # notices the stream gone
    assert profile.due() == node.clock.now + STREAM_LOST_S
    node.clock.now += STREAM_LOST_S / 2
    node.step(profile)
    assert state_of(profile) is State.REGISTERED and kubelet.register_calls == [R2]
    node.clock.now += STREAM_LOST_S / 2
    node.step(profile)
    assert kubelet.register_calls == [R2, R2]
    assert state_of(profile) is State.REGISTERED
    assert kubelet.wait_for(lambda: kubelet_has(kubelet, R2, 2), 5)


def test_an_already_connected_answer_counts_while_the_earlier_stream_lives_and_no_stream_s_after(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet = node.kubelet()
    profile = node.profile(R1)
    # A Register the profile did not send (a previous incarnation's, late): the kubelet
    # holds the socket and its stream.
    registration.register(node.kubelet_socket, R1, profile.path.name)
    assert wait_until(lambda: len(profile.servicer.counts().open_streams) == 1)
    node.step(profile)  # "already connected"
    assert state_of(profile) is State.REGISTERED
    assert "the kubelet holds this socket already" in caplog.text
    node.clock.now += NO_STREAM_S + 1
    node.step(profile)  # the earlier stream stands for the kubelet's
    assert kubelet.register_calls == [R1, R1]
    # That stream goes; none was opened since the registration, which is older than
    # NO_STREAM_S: the profile asks again.
    kubelet.disconnect(R1)
    assert wait_until(lambda: not profile.servicer.counts().open_streams)
    node.step(profile)
    assert kubelet.register_calls == [R1, R1, R1]


def test_a_register_answered_late_counts_when_the_kubelet_dialed_back(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet = node.kubelet(register_reply_delay_s=1.0)
    profile = node.profile(R1, register_timeout_s=0.3)
    node.step(profile)  # DEADLINE_EXCEEDED, after the kubelet asked the options
    assert state_of(profile) is State.REGISTERED
    assert "the kubelet dialed back" in caplog.text
    node.clock.now += FIRST_BACKOFF_S * 100
    node.step(profile)
    assert kubelet.register_calls == [R1]


def test_a_kubelet_restart_wiping_the_socket_serves_it_again_and_registers_again(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pkg.deviceplugin.server.profile")
    kubelet = node.kubelet()
    profile = node.profile(R1)
    node.step(profile)
    assert state_of(profile) is State.REGISTERED
    first = profile.servicer
    kubelet.restart()  # removes the plugin's socket, serves a new kubelet.sock
    assert not profile.path.exists()
    node.step(profile)
    assert profile.servicer is not first and answers(profile.path)
    assert state_of(profile) is State.REGISTERED
    assert kubelet.wait_for(lambda: kubelet_has(kubelet, R1, 2), 5)
    assert "was removed; serving it again" in caplog.text
    assert "registered with the kubelet (#2)" in caplog.text


def test_a_stopped_profile_removes_its_socket_and_ignores_a_register_that_returns_later(
    node: Node,
) -> None:
    node.kubelet(register_reply_delay_s=0.5)
    profile = node.profile(R1)
    profile.tick(inode(node.kubelet_socket))
    assert state_of(profile) is State.REGISTERING
    # The kubelet has dialed back and will answer "registered" half a second later.
    assert wait_until(lambda: profile.servicer.counts().options_asked == 1)
    profile.stop()
    assert profile.join(5)
    assert state_of(profile) is State.STOPPED and not profile.registered
    assert not profile.path.exists()
    node.step(profile)
    assert state_of(profile) is State.STOPPED


def test_a_profile_with_no_kubelet_sock_has_no_timer_due(node: Node) -> None:
    """Before the kubelet serves kubelet.sock a profile has nothing to do until it
    appears (the watch loop wakes on that): a timer due at once made the loop spin."""
    profile = node.profile(R1)
    node.step(profile)
    assert state_of(profile) is State.SERVING
    assert profile.due() is None
    node.kubelet()
    node.step(profile)
    assert state_of(profile) is State.REGISTERED
