"""The device-plugin gRPC service of one profile, answering from the shared seat board."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from pkg.deviceplugin.allocator.board import AllocationError, DeviceView, SeatBoard
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.metrics import NullMetrics, Recorder
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.types import ResourceName

log = logging.getLogger(__name__)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
# How often an idle ListAndWatch stream wakes to notice its server stopping.
STREAM_POLL_S = 0.5

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


class SeatPlugin(api_pb2_grpc.DevicePluginServicer):
    def __init__(
        self,
        resource: ResourceName,
        board: SeatBoard,
        pod_resources: PodResourcesClient | None,
        recorder: Recorder | None = None,
    ) -> None:
        self.resource = resource
        self._board = board
        self._pod_resources = pod_resources
        self._recorder = recorder or NullMetrics()
        self._stopped = threading.Event()
        # What the kubelet did on this socket, for the registration loop: it asks the
        # options inside Register, and holds a ListAndWatch stream while connected.
        self._counts = threading.Lock()
        self.options_asked = 0
        self.streams_opened = 0
        self.streams_active = 0

    def stop(self) -> None:
        self._stopped.set()

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        with self._counts:
            self.options_asked += 1
        return plugin_options()

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        with self._counts:
            self.streams_opened += 1
            self.streams_active += 1
        if not context.add_callback(self._stream_ended):
            self._stream_ended()
            return
        version = self._board.version
        last = self._board.devices(self.resource)
        yield _list_response(last)
        while not self._stopped.is_set() and context.is_active() and not self._board.closed:
            changed = self._board.wait_for_change(version, STREAM_POLL_S)
            if changed == version:
                continue  # an idle wake-up, only to notice a stop
            version = changed
            devices = self._board.devices(self.resource)
            if devices != last:
                last = devices
                yield _list_response(devices)

    def _stream_ended(self) -> None:
        with self._counts:
            self.streams_active -= 1

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
                list(container.available_deviceIDs),
                list(container.must_include_deviceIDs),
                container.allocation_size,
            )
            answers.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        self._recorder.observe_preferred(self.resource, time.perf_counter() - started)
        return api_pb2.PreferredAllocationResponse(container_responses=answers)

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        started = time.perf_counter()
        requests = [list(c.devices_ids) for c in request.container_requests]
        observed = None
        if self._pod_resources is not None and self._board.needs_observation(
            self.resource, requests
        ):
            observed = self._pod_resources.observe()
        try:
            allocations = self._board.allocate(self.resource, requests, observed)
        except AllocationError as exc:
            self._recorder.observe_allocate(self.resource, time.perf_counter() - started, False)
            log.warning("Allocate refused: %s", exc, extra={"resource": self.resource})
            context.abort(_STATUS[exc.code], str(exc))
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
