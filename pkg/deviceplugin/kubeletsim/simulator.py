"""A kubelet stand-in for tests and the demo, speaking the real protos over Unix sockets.

It behaves like the kubelet's device manager where the plugin can tell:
- serves ``Registration`` on ``<dir>/kubelet.sock``; ``Register`` validates the API
  version and resource name, then (asynchronously, as the kubelet does) dials the
  plugin's socket, asks ``GetDevicePluginOptions`` and consumes ``ListAndWatch``;
- when a plugin's stream ends, its devices count as unhealthy until it registers again;
- admits pods container by container: init containers first, their devices reused by
  the app containers; ``GetPreferredAllocation`` only when the plugin offers it and the
  choice is not forced; then ``Allocate`` with the chosen IDs;
- serves PodResources ``List`` from its bindings (app containers only, as the kubelet
  does) and can delete pods;
- ``restart()`` stops serving, wipes every socket in the directory and serves a new
  ``kubelet.sock``, keeping its allocations (the kubelet's checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.api.podresources.v1 import api_pb2 as pr_pb2
from pkg.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc

log = logging.getLogger(__name__)

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)


class AdmissionError(Exception):
    """The pod cannot be admitted (not enough devices, or the plugin refused)."""


@dataclass
class Endpoint:
    resource: str
    socket: str
    options: api_pb2.DevicePluginOptions
    channel: grpc.Channel
    stub: api_pb2_grpc.DevicePluginStub
    devices: dict[str, str] = field(default_factory=dict)
    connected: bool = True
    updates: int = 0
    registrations: int = 1


@dataclass
class ContainerSpec:
    name: str
    requests: Mapping[str, int]


@dataclass
class Allocation:
    resource: str
    device_ids: list[str]
    response: api_pb2.ContainerAllocateResponse


@dataclass
class Pod:
    namespace: str
    name: str
    init_containers: list[ContainerSpec]
    containers: list[ContainerSpec]
    allocations: dict[str, list[Allocation]] = field(default_factory=dict)


class KubeletSimulator(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet_dir: Path, pod_resources_socket: Path) -> None:
        self.kubelet_dir = kubelet_dir
        self.pod_resources_socket = pod_resources_socket
        self.endpoints: dict[str, Endpoint] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.register_errors: list[str] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._registration: grpc.Server | None = None
        self._pod_resources: grpc.Server | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        self._start_registration()
        self.pod_resources_socket.parent.mkdir(parents=True, exist_ok=True)
        self._remove(self.pod_resources_socket)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pr_grpc.add_PodResourcesListerServicer_to_server(_PodResourcesServicer(self), server)
        server.add_insecure_port(f"unix://{self.pod_resources_socket}")
        server.start()
        self._pod_resources = server

    def stop(self) -> None:
        self._stop_registration()
        if self._pod_resources is not None:
            self._pod_resources.stop(grace=None)
            self._pod_resources = None
        self._remove(self.pod_resources_socket)

    def restart(self) -> None:
        """What a kubelet restart looks like to plugins: every socket wiped, a new kubelet.sock."""
        self._stop_registration()
        with self._lock:
            for endpoint in self.endpoints.values():
                endpoint.connected = False
                endpoint.channel.close()
            self._changed.notify_all()
        for entry in self.kubelet_dir.iterdir():
            if entry.name != CHECKPOINT:
                self._remove(entry)
        self._start_registration()

    def _start_registration(self) -> None:
        path = self.kubelet_dir / KUBELET_SOCKET
        self._remove(path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{path}")
        server.start()
        self._registration = server

    def _stop_registration(self) -> None:
        if self._registration is not None:
            self._registration.stop(grace=None)
            self._registration = None
        self._remove(self.kubelet_dir / KUBELET_SOCKET)

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # ---- Registration service ----------------------------------------------------------

    def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> api_pb2.Empty:
        problem = self._validate(request)
        if problem is not None:
            self.register_errors.append(problem)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        threading.Thread(
            target=self._connect, args=(request,), name=f"sim-{request.resource_name}", daemon=True
        ).start()
        return api_pb2.Empty()

    def _validate(self, request: api_pb2.RegisterRequest) -> str | None:
        if request.version not in SUPPORTED_VERSIONS:
            return f"unsupported device plugin API version {request.version!r}"
        domain, slash, name = request.resource_name.partition("/")
        if not slash or not name or "." not in domain or domain.endswith("kubernetes.io"):
            return f"invalid extended resource name {request.resource_name!r}"
        if not request.endpoint or "/" in request.endpoint:
            return f"invalid endpoint {request.endpoint!r}"
        return None

    def _connect(self, request: api_pb2.RegisterRequest) -> None:
        channel = grpc.insecure_channel(f"unix://{self.kubelet_dir / request.endpoint}")
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
            stream = stub.ListAndWatch(api_pb2.Empty())
        except grpc.RpcError as exc:
            self.register_errors.append(f"{request.resource_name}: dial back failed: {exc}")
            channel.close()
            return
        with self._lock:
            old = self.endpoints.get(request.resource_name)
            endpoint = Endpoint(request.resource_name, request.endpoint, options, channel, stub)
            if old is not None:
                endpoint.devices = dict(old.devices)
                endpoint.registrations = old.registrations + 1
                if old.connected:
                    old.connected = False
                    old.channel.close()
            self.endpoints[request.resource_name] = endpoint
            self._changed.notify_all()
        try:
            for update in stream:
                with self._lock:
                    endpoint.devices = {d.ID: d.health for d in update.devices}
                    endpoint.updates += 1
                    self._changed.notify_all()
        except grpc.RpcError:
            pass
        with self._lock:
            if self.endpoints.get(request.resource_name) is endpoint:
                endpoint.connected = False
                endpoint.devices = {d: "Unhealthy" for d in endpoint.devices}
                endpoint.updates += 1
            self._changed.notify_all()

    # ---- observation -------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    def healthy(self, resource: str) -> list[str]:
        with self._lock:
            endpoint = self.endpoints.get(resource)
            if endpoint is None:
                return []
            return sorted(d for d, h in endpoint.devices.items() if h == "Healthy")

    def allocated(self, resource: str) -> set[str]:
        with self._lock:
            return {
                device_id
                for pod in self.pods.values()
                for allocations in pod.allocations.values()
                for a in allocations
                if a.resource == resource
                for device_id in a.device_ids
            }

    # ---- admission -----------------------------------------------------------------

    def admit(
        self,
        name: str,
        containers: Sequence[ContainerSpec],
        init_containers: Sequence[ContainerSpec] = (),
        namespace: str = "default",
    ) -> Pod:
        """Admit a pod: allocate every container's devices, or raise AdmissionError."""
        pod = Pod(namespace, name, list(init_containers), list(containers))
        with self._lock:
            if (namespace, name) in self.pods:
                raise AdmissionError(f"pod {namespace}/{name} exists")
            self.pods[(namespace, name)] = pod
        try:
            reusable: dict[str, list[str]] = {}
            for spec in pod.init_containers:
                for allocation in self._allocate_container(pod, spec, reusable):
                    reusable[allocation.resource] = allocation.device_ids
            for spec in pod.containers:
                taken = self._allocate_container(pod, spec, reusable)
                for allocation in taken:
                    reused = reusable.get(allocation.resource, [])
                    reusable[allocation.resource] = [
                        d for d in reused if d not in allocation.device_ids
                    ]
        except Exception:
            with self._lock:
                del self.pods[(namespace, name)]
            raise
        return pod

    def _allocate_container(
        self, pod: Pod, spec: ContainerSpec, reusable: Mapping[str, list[str]]
    ) -> list[Allocation]:
        done: list[Allocation] = []
        for resource, count in spec.requests.items():
            with self._lock:
                endpoint = self.endpoints.get(resource)
                if endpoint is None or not endpoint.connected:
                    raise AdmissionError(f"no device plugin registered for {resource}")
                reuse = list(reusable.get(resource, []))[:count]
                free = [d for d in self.healthy(resource) if d not in self.allocated(resource)]
            needed = count - len(reuse)
            if needed > len(free):
                raise AdmissionError(
                    f"{resource}: requested {count}, only {len(free) + len(reuse)} available"
                )
            chosen = reuse + self._choose(endpoint, free, reuse, needed)
            try:
                reply = endpoint.stub.Allocate(
                    api_pb2.AllocateRequest(
                        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen)]
                    ),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                raise AdmissionError(f"{resource}: Allocate failed: {detail}") from exc
            allocation = Allocation(resource, chosen, reply.container_responses[0])
            with self._lock:
                pod.allocations.setdefault(spec.name, []).append(allocation)
            done.append(allocation)
        return done

    def _choose(
        self, endpoint: Endpoint, free: list[str], reuse: list[str], needed: int
    ) -> list[str]:
        if needed == 0:
            return []
        if not endpoint.options.get_preferred_allocation_available or needed == len(free):
            return free[:needed]
        reply = endpoint.stub.GetPreferredAllocation(
            api_pb2.PreferredAllocationRequest(
                container_requests=[
                    api_pb2.ContainerPreferredAllocationRequest(
                        available_deviceIDs=free + reuse,
                        must_include_deviceIDs=reuse,
                        allocation_size=needed + len(reuse),
                    )
                ]
            ),
            timeout=10,
        )
        picked = [d for d in reply.container_responses[0].deviceIDs if d not in reuse]
        if len(picked) != needed or not set(picked) <= set(free):
            raise AdmissionError(f"{endpoint.resource}: bad preferred allocation {picked}")
        return picked

    def delete(self, name: str, namespace: str = "default") -> None:
        with self._lock:
            self.pods.pop((namespace, name), None)
            self._changed.notify_all()


class _PodResourcesServicer(pr_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: KubeletSimulator) -> None:
        self._kubelet = kubelet

    def List(
        self, request: pr_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.ListPodResourcesResponse:
        with self._kubelet._lock:
            pods = [self._pod(pod) for pod in self._kubelet.pods.values()]
        return pr_pb2.ListPodResourcesResponse(pod_resources=pods)

    def Get(
        self, request: pr_pb2.GetPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.GetPodResourcesResponse:
        with self._kubelet._lock:
            pod = self._kubelet.pods.get((request.pod_namespace, request.pod_name))
            if pod is None:
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"pod {request.pod_namespace}/{request.pod_name} not found",
                )
            return pr_pb2.GetPodResourcesResponse(pod_resources=self._pod(pod))

    def GetAllocatableResources(
        self, request: pr_pb2.AllocatableResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.AllocatableResourcesResponse:
        devices = [
            pr_pb2.ContainerDevices(
                resource_name=resource, device_ids=self._kubelet.healthy(resource)
            )
            for resource in sorted(self._kubelet.endpoints)
        ]
        return pr_pb2.AllocatableResourcesResponse(devices=devices)

    @staticmethod
    def _pod(pod: Pod) -> pr_pb2.PodResources:
        # Like the kubelet, List shows app containers only, never init containers.
        containers = [
            pr_pb2.ContainerResources(
                name=spec.name,
                devices=[
                    pr_pb2.ContainerDevices(resource_name=a.resource, device_ids=a.device_ids)
                    for a in pod.allocations.get(spec.name, [])
                ],
            )
            for spec in pod.containers
        ]
        return pr_pb2.PodResources(name=pod.name, namespace=pod.namespace, containers=containers)
