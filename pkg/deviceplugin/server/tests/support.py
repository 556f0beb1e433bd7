"""Real gRPC servers on real Unix sockets for the server's unit tests.

A seat plugin served the way the manager serves it, a reader that drains a
ListAndWatch stream in the background (so a test can wait for "nothing more" without
blocking on the stream), and a stand-in for the kubelet's PodResources service whose
answer each test sets.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.api.podresources.v1 import api_pb2 as pr_pb2
from pkg.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc
from pkg.deviceplugin.server.plugin import SeatPlugin


def short_dir(prefix: str = "kyb-u-") -> Path:
    """A fresh directory under /tmp: a Unix socket path must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def short_root() -> Iterator[Path]:
    """A short directory, removed afterwards."""
    root = short_dir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def target(path: Path) -> str:
    return f"unix://{path}"


class ServedPlugin:
    """One profile's servicer on its own gRPC server, plus a client channel to it."""

    def __init__(self, plugin: api_pb2_grpc.DevicePluginServicer, path: Path) -> None:
        self.plugin = plugin
        self.path = path
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_DevicePluginServicer_to_server(plugin, self.server)
        self.server.add_insecure_port(target(path))
        self.server.start()
        self.channel = grpc.insecure_channel(target(path))
        self.stub = api_pb2_grpc.DevicePluginStub(self.channel)

    def watch(self) -> Watch:
        return Watch(self.stub)

    def allocate(self, *containers: Sequence[str]) -> api_pb2.AllocateResponse:
        return self.stub.Allocate(
            api_pb2.AllocateRequest(
                container_requests=[
                    api_pb2.ContainerAllocateRequest(devices_ids=list(ids)) for ids in containers
                ]
            ),
            timeout=5,
        )

    def stop(self) -> None:
        if isinstance(self.plugin, SeatPlugin):
            self.plugin.stop()
        self.channel.close()
        self.server.stop(grace=None).wait(5)


ENDED = "ended"
"""What :class:`Watch` reads once the server ended the stream."""


class Watch:
    """A ListAndWatch stream read in the background: every message, then ``ENDED`` or the
    ``grpc.RpcError`` that ended it, in the order they came."""

    def __init__(self, stub: api_pb2_grpc.DevicePluginStub) -> None:
        # A deadline, so that a stream the plugin never ends cannot outlive the test.
        self.call = stub.ListAndWatch(api_pb2.Empty(), timeout=60)
        self._read: queue.Queue[api_pb2.ListAndWatchResponse | grpc.RpcError | str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        try:
            for message in self.call:
                self._read.put(message)
        except grpc.RpcError as exc:
            self._read.put(exc)
            return
        self._read.put(ENDED)

    def next(self, timeout_s: float = 5.0) -> api_pb2.ListAndWatchResponse | grpc.RpcError | str:
        """The next thing the stream did; raises ``queue.Empty`` when it did nothing."""
        return self._read.get(timeout=timeout_s)

    def message(self, timeout_s: float = 5.0) -> api_pb2.ListAndWatchResponse:
        got = self.next(timeout_s)
        assert isinstance(got, api_pb2.ListAndWatchResponse), got
        return got

    def quiet_for(self, seconds: float) -> bool:
        """True when the stream sent nothing and did not end for ``seconds``."""
        try:
            self._read.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def cancel(self) -> None:
        self.call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped


def health(message: api_pb2.ListAndWatchResponse) -> dict[str, str]:
    return {d.ID: d.health for d in message.devices}


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class FakePodResources(pr_grpc.PodResourcesListerServicer):
    """The kubelet's PodResources ``List``: answers ``pods``, or aborts with ``error``,
    after ``delay_s``; counts the calls."""

    def __init__(self) -> None:
        self.pods: list[pr_pb2.PodResources] = []
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.delay_s = 0.0
        self.calls = 0

    def List(
        self, request: pr_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.ListPodResourcesResponse:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            context.abort(*self.error)
        return pr_pb2.ListPodResourcesResponse(pod_resources=self.pods)

    def Get(
        self, request: pr_pb2.GetPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.GetPodResourcesResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the plugin")

    def GetAllocatableResources(
        self, request: pr_pb2.AllocatableResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.AllocatableResourcesResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the plugin")


def pod(
    namespace: str, name: str, containers: dict[str, dict[str, list[str]]]
) -> pr_pb2.PodResources:
    """A PodResources entry: per container, device IDs per resource."""
    return pr_pb2.PodResources(
        namespace=namespace,
        name=name,
        containers=[
            pr_pb2.ContainerResources(
                name=container,
                devices=[
                    pr_pb2.ContainerDevices(resource_name=resource, device_ids=ids)
                    for resource, ids in devices.items()
                ],
            )
            for container, devices in containers.items()
        ],
    )


class PodResourcesServer:
    """A :class:`FakePodResources` served on ``path``; ``stop`` and ``start`` again
    stand for a kubelet restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fake = FakePodResources()
        self._server: grpc.Server | None = None

    def start(self) -> PodResourcesServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pr_grpc.add_PodResourcesListerServicer_to_server(self.fake, server)
        server.add_insecure_port(target(self.path))
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        self.path.unlink(missing_ok=True)
