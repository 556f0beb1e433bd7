"""The device-plugin gRPC service of one profile, answering from the shared seat board.

The board binds seats; what a container gets for them (envs, annotations, device
nodes or CDI names; ``allocator/response.py``) is built here, at the edge, where the
node's ``/dev`` is known."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import grpc

from pkg.deviceplugin.allocator import response
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.views import DeviceView
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.metrics import NullMetrics, Recorder
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.types import DeviceId, ResourceName

log = logging.getLogger(__name__)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
# A stream's end (the client gone, the server stopping, an eviction) wakes it at once;
# this is only a safety net for a wake-up lost.
STREAM_POLL_S = 30.0
# ListAndWatch streams one profile keeps open: the kubelet's, and a second for the
# moment a kubelet restart or a registration overlaps the old one. Each holds a server
# worker for its life; the rest of the workers (manager.SERVER_WORKERS) stay for
# Allocate, GetPreferredAllocation, the options and the liveness probe. A newer stream
# ends the oldest rather than being refused: the kubelet opens its stream right after
# each Register, so a local client holding streams can never keep it out, and the
# registration loop notices the kubelet's stream going and registers again.
MAX_STREAMS = 2

_STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def plugin_options() -> api_pb2.DevicePluginOptions:
    return api_pb2.DevicePluginOptions(
        pre_start_required=False, get_preferred_allocation_available=True
    )


def device_message(view: DeviceView) -> api_pb2.Device:
    topology = None
    if view.numa_nodes:
        topology = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=n) for n in view.numa_nodes])
    return api_pb2.Device(
        ID=view.device_id, health=HEALTHY if view.healthy else UNHEALTHY, topology=topology
    )


def _list_response(devices: list[DeviceView]) -> api_pb2.ListAndWatchResponse:
    return api_pb2.ListAndWatchResponse(devices=[device_message(d) for d in devices])


class StreamCounts(NamedTuple):
    """What the kubelet did on one socket, read at one moment (``SeatPlugin.counts``)."""

    options_asked: int
    streams_opened: int
    open_streams: frozenset[int]


class SeatPlugin(api_pb2_grpc.DevicePluginServicer):
    def __init__(
        self,
        resource: ResourceName,
        board: SeatBoard,
        pod_resources: PodResourcesClient | None,
        recorder: Recorder | None = None,
        on_streams: Callable[[], None] | None = None,
        *,
        dev_root: Path = Path("/"),
    ) -> None:
        """``on_streams`` is called whenever a ListAndWatch stream opens or ends;
        ``dev_root``: where the node's ``/dev`` is (the optional device nodes offered
        are those that exist there)."""
        self.resource = resource
        self._dev_root = dev_root
        self._on_streams = on_streams or (lambda: None)
        self._board = board
        self._pod_resources = pod_resources
        self._recorder = recorder or NullMetrics()
        self._stopped = threading.Event()
        # What the kubelet did on this socket, for the registration loop: it asks the
        # options inside Register, and holds a ListAndWatch stream while connected.
        self._counts = threading.Lock()
        self.options_asked = 0
        # Streams are numbered 1, 2, ... as they open; ``_open`` maps the number of each
        # one not yet ended (or evicted) to the event that ends it.
        self.streams_opened = 0
        self._open: dict[int, threading.Event] = {}

    @property
    def streams_active(self) -> int:
        with self._counts:
            return len(self._open)

    def stream_open(self, number: int) -> bool:
        """Whether stream ``number`` is still open (not ended, not evicted)."""
        with self._counts:
            return number in self._open

    def counts(self) -> StreamCounts:
        """The counters together, under their lock: the registration loop compares them
        across a Register and against the stream the kubelet opened."""
        with self._counts:
            return StreamCounts(self.options_asked, self.streams_opened, frozenset(self._open))

    def stop(self) -> None:
        self._stopped.set()
        self._board.wake()

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        with self._counts:
            self.options_asked += 1
        return plugin_options()

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        ended = threading.Event()
        with self._counts:
            self.streams_opened += 1
            number = self.streams_opened
            self._open[number] = ended
            evicted = sorted(self._open)[:-MAX_STREAMS]
            for old in evicted:
                self._open.pop(old).set()
        self._on_streams()
        if evicted:
            log.warning(
                "more than %d ListAndWatch streams on this socket: ended the oldest (#%s) "
                "for the newest (#%d)",
                MAX_STREAMS,
                ", #".join(map(str, evicted)),
                number,
                extra={"resource": self.resource},
            )
            self._board.wake()

        def end() -> None:
            with self._counts:
                was_open = self._open.pop(number, None) is not None
            ended.set()
            self._board.wake()
            if was_open:
                self._on_streams()

        if not context.add_callback(end):
            end()
            return
        try:
            version = self._board.version
            last = self._board.devices(self.resource)
            yield _list_response(last)
            while not (ended.is_set() or self._stopped.is_set() or self._board.closed):
                changed = self._board.wait_for_change(
                    version, STREAM_POLL_S, lambda: ended.is_set() or self._stopped.is_set()
                )
                if changed == version:
                    continue  # woken to check the stream's end, or the safety net
                version = changed
                devices = self._board.devices(self.resource)
                if devices != last:
                    last = devices
                    yield _list_response(devices)
        finally:
            end()

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        started = time.perf_counter()
        answers = []
        for container in request.container_requests:
            if container.allocation_size < 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "allocation_size must be >= 0")
            chosen = self._board.preferred(
                self.resource,
                _device_ids(container.available_deviceIDs),
                _device_ids(container.must_include_deviceIDs),
                container.allocation_size,
            )
            answers.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        self._recorder.observe_preferred(self.resource, time.perf_counter() - started)
        return api_pb2.PreferredAllocationResponse(container_responses=answers)

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        started = time.perf_counter()
        requests = [_device_ids(c.devices_ids) for c in request.container_requests]
        observed = None
        if self._pod_resources is not None and self._board.needs_observation(
            self.resource, requests
        ):
            observed = self._pod_resources.observe()
        try:
            bound = self._board.allocate(self.resource, requests, observed)
        except AllocationError as exc:
            self._recorder.observe_allocate(self.resource, time.perf_counter() - started, False)
            log.warning("Allocate refused: %s", exc, extra={"resource": self.resource})
            context.abort(_STATUS[exc.code], str(exc))
        allocations = response.build_all(self.resource, bound, self._board.policy, self._dev_root)
        self._recorder.observe_allocate(self.resource, time.perf_counter() - started, True)
        return api_pb2.AllocateResponse(
            container_responses=[
                api_pb2.ContainerAllocateResponse(
                    envs=a.envs,
                    annotations=a.annotations,
                    devices=[
                        api_pb2.DeviceSpec(container_path=p, host_path=p, permissions="rw")
                        for p in a.device_paths
                    ],
                    cdi_devices=[api_pb2.CDIDevice(name=n) for n in a.cdi_devices],
                )
                for a in allocations
            ]
        )

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


def _device_ids(ids: Iterable[str]) -> list[DeviceId]:
    """The kubelet's device IDs, named as what they are from here on (any string: the
    board refuses those it does not know)."""
    return [DeviceId(device_id) for device_id in ids]
