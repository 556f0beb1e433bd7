"""The liveness check against real plugin sockets: served, missing, stale and wedged."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.tests.support import R1, R2, seed_layout
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2
from pkg.deviceplugin.server import liveness
from pkg.deviceplugin.server.plugin import SeatPlugin
from pkg.deviceplugin.server.tests.support import ServedPlugin, short_root
from pkg.deviceplugin.types import ResourceName, socket_name_of


class WedgedPlugin(SeatPlugin):
    """A plugin whose options call never returns (a deadlocked board, say)."""

    def __init__(self, resource: ResourceName, board: SeatBoard) -> None:
        super().__init__(resource, board, None)
        self.release = threading.Event()

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        self.release.wait(10)
        return super().GetDevicePluginOptions(request, context)


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    with short_root() as root:
        yield root


@pytest.fixture
def board() -> Iterator[SeatBoard]:
    made = SeatBoard(seed_layout(), Policy(), None, release_grace_s=60)
    yield made
    made.close()


@pytest.fixture
def served() -> Iterator[list[ServedPlugin]]:
    plugins: list[ServedPlugin] = []
    yield plugins
    for plugin in plugins:
        if isinstance(plugin.plugin, WedgedPlugin):
            plugin.plugin.release.set()
        plugin.stop()


def serve(served: list[ServedPlugin], kubelet_dir: Path, plugin: SeatPlugin) -> ServedPlugin:
    one = ServedPlugin(plugin, kubelet_dir / socket_name_of(plugin.resource))
    served.append(one)
    return one


def test_every_profile_answering_is_no_problem(
    kubelet_dir: Path, board: SeatBoard, served: list[ServedPlugin]
) -> None:
    plugins = [SeatPlugin(r, board, None) for r in (R1, R2)]
    for plugin in plugins:
        serve(served, kubelet_dir, plugin)
    assert liveness.check(kubelet_dir, (R1, R2), timeout_s=2.0) == []
    # it asked each socket, it did not just look at the files
    assert [p.options_asked for p in plugins] == [1, 1]


def test_a_missing_socket_is_one_line_naming_its_profile_and_path(
    kubelet_dir: Path, board: SeatBoard, served: list[ServedPlugin]
) -> None:
    serve(served, kubelet_dir, SeatPlugin(R1, board, None))
    [problem] = liveness.check(kubelet_dir, (R1, R2), timeout_s=2.0)
    assert problem == f"{R2}: socket {kubelet_dir / socket_name_of(R2)} does not exist"


def test_a_socket_file_nobody_serves_any_more_does_not_answer(kubelet_dir: Path) -> None:
    # what a killed plugin leaves behind: the file, no listener
    path = kubelet_dir / socket_name_of(R1)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    [problem] = liveness.check(kubelet_dir, (R1,), timeout_s=2.0)
    assert problem == f"{R1}: {path} does not answer (UNAVAILABLE)"


def test_a_plugin_that_accepts_but_never_answers_fails_within_the_timeout(
    kubelet_dir: Path, board: SeatBoard, served: list[ServedPlugin]
) -> None:
    serve(served, kubelet_dir, SeatPlugin(R1, board, None))
    serve(served, kubelet_dir, WedgedPlugin(R2, board))
    started = time.monotonic()
    problems = liveness.check(kubelet_dir, (R1, R2), timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    assert problems == [
        f"{R2}: {kubelet_dir / socket_name_of(R2)} does not answer (DEADLINE_EXCEEDED)"
    ]
