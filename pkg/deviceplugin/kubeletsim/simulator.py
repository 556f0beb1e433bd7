"""A kubelet stand-in for tests and the demo, speaking the real protos over Unix sockets.

It behaves like the kubelet's device manager (checked against the real one at
k8s.io/kubernetes v1.37.2, see ``conformance/kubelet/README.md``) where the plugin can
tell:
- serves ``Registration`` on ``<dir>/kubelet.sock``. ``Register`` is synchronous: it
  validates the API version and resource name, then, inside the call and under the
  caller's deadline (at most ``DIAL_TIMEOUT_S``), dials the plugin's socket and asks
  ``GetDevicePluginOptions``; any failure is the ``Register`` error. Only then does it
  answer, and it consumes ``ListAndWatch`` in the background;
- a second ``Register`` for a socket it is connected to is refused with "device
  plugin already connected", and, as in the real manager, the refusal drops its record
  of the live connection: it no longer notices that stream ending (the devices stay as
  they were) and refuses that socket until it restarts;
- when a plugin's stream ends, its devices count as unhealthy and it does not
  reconnect: the plugin must register again;
- admits pods container by container: init containers first, their devices reused by
  the app containers; ``GetPreferredAllocation`` whenever the plugin offers it and
  devices are needed beyond the reused ones (even all that are left: without a NUMA
  hint, the kubelet's default, the manager always asks), with the reused IDs both in
  ``available_deviceIDs`` and ``must_include_deviceIDs``; its answer is intersected
  with what is available and a short one filled from the rest; then ``Allocate`` with
  the chosen IDs. Device IDs reach the plugin in random order, as Go set iteration
  gives them;
- a resource the node does not advertise fails admission (the scheduler would never
  have placed the pod here; the real manager alone would admit it without devices);
- ``run_options`` merges what every resource's ``Allocate`` answered for one container
  as the kubelet does: on a duplicate env or annotation the first seen wins, in random
  resource order, so a container asking for two seat profiles sees one of them;
- serves PodResources ``List`` from its bindings (app containers only, one entry per
  device, as the kubelet does) and can delete pods;
- ``restart()`` stops serving, wipes every socket in the directory and serves a new
  ``kubelet.sock``, keeping its allocations (the kubelet's checkpoint); every resource
  has no device (capacity 0) until its plugin registers again. As the real kubelet
  binary does (``conformance/kubelet/README.md``, "The real kubelet binary"), PodResources
  ``List`` then shows no pod until the running pods are re-admitted,
  ``readmit_after_s`` (70 ms, as measured) after the new ``kubelet.sock``; re-admission
  lets running app containers be but checks each init container's devices again, and
  refuses (kills) the pod when their resource has no healthy device or one of them is
  not healthy (kubernetes issues 124345 and 138446). Refused pods land in ``killed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.api.podresources.v1 import api_pb2 as pr_pb2
from pkg.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc
from pkg.deviceplugin.grpcutil import rpc_detail

log = logging.getLogger(__name__)

T = TypeVar("T")

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)
# The kubelet's dial-back gives up after this long (under the Register deadline).
DIAL_TIMEOUT_S = 10.0
# A restarted kubelet re-admits its running pods this long after serving kubelet.sock
# (v1.37.2 standalone, static pods: 66-79 ms over 8 restarts, conformance/kubelet).
READMIT_AFTER_S = 0.07


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
    # False once a refused second Register dropped the kubelet's record of it: its
    # stream ending then goes unnoticed, as in the real manager.
    tracked: bool = True
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
class RunOptions:
    envs: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)  # container path -> host path
    cdi_devices: list[str] = field(default_factory=list)


@dataclass
class Pod:
    namespace: str
    name: str
    init_containers: list[ContainerSpec]
    containers: list[ContainerSpec]
    allocations: dict[str, list[Allocation]] = field(default_factory=dict)


class KubeletSimulator(api_pb2_grpc.RegistrationServicer):
    def __init__(
        self,
        kubelet_dir: Path,
        pod_resources_socket: Path,
        *,
        seed: int | None = None,
        register_reply_delay_s: float = 0.0,
    ) -> None:
        """``register_reply_delay_s`` holds each ``Register`` answer after the work is
        done (dialed back, connected): a loaded kubelet, or a reply late on the way."""
        self.kubelet_dir = kubelet_dir
        self.pod_resources_socket = pod_resources_socket
        self.register_reply_delay_s = register_reply_delay_s
        # The primary endpoint per resource (the last one connected), as the kubelet's
        # ``endpoints`` map; ``_connected`` is its ``endpointStore`` by socket path.
        self.endpoints: dict[str, Endpoint] = {}
        self._connected: dict[tuple[str, str], Endpoint] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.list_calls = 0
        """PodResources ``List`` calls answered (as the real kubelet, whatever it shows)."""
        # Pods a restart's re-admission refused, with the kubelet's reason.
        self.killed: dict[tuple[str, str], str] = {}
        # Pods a restart took down, until its re-admission runs.
        self._awaiting: dict[tuple[str, str], Pod] = {}
        self._readmission: threading.Timer | None = None
        self.register_errors: list[str] = []
        self.register_calls: list[str] = []
        self.registers_in_flight = 0
        self.max_registers_in_flight = 0
        self._random = random.Random(seed)
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
        self._cancel_readmission()
        with self._lock:  # a stop before the re-admission: they stay, unchecked
            self.pods.update(self._awaiting)
            self._awaiting.clear()
        self._stop_registration()
        if self._pod_resources is not None:
            self._pod_resources.stop(grace=None)
            self._pod_resources = None
        self._remove(self.pod_resources_socket)

    def restart(self, readmit_after_s: float = READMIT_AFTER_S) -> None:
        """What a kubelet restart looks like to plugins: every socket wiped, a new
        kubelet.sock, then the running pods re-admitted ``readmit_after_s`` later."""
        self._cancel_readmission()
        self._stop_registration()
        with self._lock:
            # The new kubelet knows the resources from its checkpoint, with no device
            # (capacity 0) until their plugins register again.
            for endpoint in [*self.endpoints.values(), *self._connected.values()]:
                endpoint.tracked = False
                endpoint.connected = False
                endpoint.devices = {}
                endpoint.updates += 1
                endpoint.channel.close()
            self._connected.clear()
            # Its PodResources answers before the pods are back.
            self._awaiting.update(self.pods)
            self.pods.clear()
            self._changed.notify_all()
        for entry in self.kubelet_dir.iterdir():
            if entry.name != CHECKPOINT:
                self._remove(entry)
        self._start_registration()
        timer = threading.Timer(readmit_after_s, self._readmit)
        timer.daemon = True
        self._readmission = timer
        timer.start()

    def wait_readmitted(self, timeout_s: float = 5.0) -> bool:
        """Wait until a restart's re-admission has run."""
        timer = self._readmission
        if timer is not None:
            timer.join(timeout_s)
            return not timer.is_alive()
        return True

    def _cancel_readmission(self) -> None:
        timer, self._readmission = self._readmission, None
        if timer is not None:
            timer.cancel()
            timer.join()

    def _readmit(self) -> None:
        with self._lock:
            running, self._awaiting = self._awaiting, {}
            for key, pod in running.items():
                refused = self._readmission_refusal(pod)
                if refused is None:
                    self.pods.setdefault(key, pod)
                else:
                    log.warning("re-admission refused pod %s/%s: %s", *key, refused)
                    self.killed[key] = refused
            self._changed.notify_all()

    def _readmission_refusal(self, pod: Pod) -> str | None:
        """The real manager's ``devicesToAllocate`` for an exited init container whose
        devices the checkpoint holds (a running app container is skipped)."""
        for spec in pod.init_containers:
            for allocation in pod.allocations.get(spec.name, []):
                resource = allocation.resource
                healthy = set(self.healthy(resource))
                if not healthy:
                    return (
                        f"no healthy devices present; cannot allocate unhealthy devices {resource}"
                    )
                if not healthy >= set(allocation.device_ids):
                    return (
                        "previously allocated devices are no longer healthy; "
                        f"cannot allocate unhealthy devices {resource}"
                    )
        return None

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
        with self._lock:
            self.register_calls.append(request.resource_name)
            self.registers_in_flight += 1
            self.max_registers_in_flight = max(
                self.max_registers_in_flight, self.registers_in_flight
            )
        try:
            problem = self._validate(request)
            if problem is not None:
                self.register_errors.append(problem)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            problem = self._connect(request, context)
            if self.register_reply_delay_s:
                time.sleep(self.register_reply_delay_s)
            if problem is not None:
                self.register_errors.append(problem)
                context.abort(grpc.StatusCode.UNKNOWN, problem)
            return api_pb2.Empty()
        finally:
            with self._lock:
                self.registers_in_flight -= 1
                self._changed.notify_all()

    def _validate(self, request: api_pb2.RegisterRequest) -> str | None:
        if request.version not in SUPPORTED_VERSIONS:
            return f"unsupported device plugin API version {request.version!r}"
        domain, slash, name = request.resource_name.partition("/")
        if not slash or not name or "." not in domain or domain.endswith("kubernetes.io"):
            return f"invalid extended resource name {request.resource_name!r}"
        if not request.endpoint or "/" in request.endpoint:
            return f"invalid endpoint {request.endpoint!r}"
        return None

    def _connect(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> str | None:
        """Dial the plugin back and ask its options, inside Register; None when connected."""
        resource, socket = request.resource_name, request.endpoint
        remaining = context.time_remaining()
        timeout = DIAL_TIMEOUT_S if remaining is None else min(DIAL_TIMEOUT_S, remaining)
        channel = grpc.insecure_channel(f"unix://{self.kubelet_dir / socket}")
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            grpc.channel_ready_future(channel).result(timeout=max(timeout, 0.0))
            options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=max(timeout, 0.001))
        except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
            channel.close()
            return f"failed to dial device plugin {socket}: {exc}"
        endpoint = Endpoint(resource, socket, options, channel, stub)
        with self._lock:
            live = self._connected.get((resource, socket))
            if live is not None:
                # The real manager refuses, and its cleanup of the refused client
                # removes the live client's record too (both have this socket path),
                # while the endpoint stays: this socket is refused from now on.
                live.tracked = False
                channel.close()
                return f"device plugin already connected: {self.kubelet_dir / socket}"
            old = self.endpoints.get(resource)
            if old is not None:
                endpoint.devices = dict(old.devices)
                endpoint.registrations = old.registrations + 1
            self.endpoints[resource] = endpoint
            self._connected[(resource, socket)] = endpoint
            self._changed.notify_all()
        threading.Thread(
            target=self._watch, args=(endpoint,), name=f"sim-{resource}", daemon=True
        ).start()
        return None

    def _watch(self, endpoint: Endpoint) -> None:
        try:
            for update in endpoint.stub.ListAndWatch(api_pb2.Empty()):
                with self._lock:
                    endpoint.devices = {d.ID: d.health for d in update.devices}
                    endpoint.updates += 1
                    self._changed.notify_all()
        except (grpc.RpcError, ValueError):
            pass  # ValueError: the channel was closed under the stream (restart)
        with self._lock:
            if not endpoint.tracked:
                return  # the kubelet lost track of it: nobody notices the stream ending
            self._connected.pop((endpoint.resource, endpoint.socket), None)
            if self.endpoints.get(endpoint.resource) is endpoint:
                endpoint.connected = False
                endpoint.devices = {d: "Unhealthy" for d in endpoint.devices}
                endpoint.updates += 1
            endpoint.channel.close()
            self._changed.notify_all()

    def disconnect(self, resource: str) -> None:
        """Drop a plugin's stream from the kubelet's side (what a broken connection does)."""
        with self._lock:
            endpoint = self.endpoints.get(resource)
        if endpoint is not None:
            endpoint.channel.close()

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
                # As the real manager (devicesToAllocate, no NUMA hint): reusable
                # devices first, then the plugin's preference among the available
                # ones, then whatever is left; every set in random order.
                chosen = self._shuffled(reusable.get(resource, []))[:count]
                needed = count - len(chosen)
                free = [d for d in self.healthy(resource) if d not in self.allocated(resource)]
                free = [d for d in self._shuffled(free) if d not in chosen]
            if needed > len(free):
                raise AdmissionError(
                    f"{resource}: requested number of devices unavailable: "
                    f"requested {count}, available {len(free) + len(chosen)}"
                )
            if needed:
                preferred = set(self._preferred(endpoint, free, chosen, count))
                chosen += [d for d in free if d in preferred][:needed]
                chosen += [d for d in free if d not in chosen][: count - len(chosen)]
            try:
                reply = endpoint.stub.Allocate(
                    api_pb2.AllocateRequest(
                        container_requests=[
                            api_pb2.ContainerAllocateRequest(devices_ids=self._shuffled(chosen))
                        ]
                    ),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                raise AdmissionError(f"{resource}: Allocate failed: {rpc_detail(exc)}") from exc
            if not reply.container_responses:
                raise AdmissionError(f"{resource}: Allocate answered no container response")
            allocation = Allocation(resource, chosen, reply.container_responses[0])
            with self._lock:
                pod.allocations.setdefault(spec.name, []).append(allocation)
            done.append(allocation)
        return done

    def _shuffled(self, items: Sequence[T]) -> list[T]:
        """``items`` in random order, as Go map and set iteration gives them."""
        out = list(items)
        self._random.shuffle(out)
        return out

    def _preferred(
        self, endpoint: Endpoint, free: list[str], chosen: list[str], size: int
    ) -> list[str]:
        """The plugin's preference, when it offers one; an error fails the admission."""
        if not endpoint.options.get_preferred_allocation_available:
            return []
        try:
            reply = endpoint.stub.GetPreferredAllocation(
                api_pb2.PreferredAllocationRequest(
                    container_requests=[
                        api_pb2.ContainerPreferredAllocationRequest(
                            available_deviceIDs=self._shuffled(free + chosen),
                            must_include_deviceIDs=self._shuffled(chosen),
                            allocation_size=size,
                        )
                    ]
                ),
                timeout=10,
            )
        except grpc.RpcError as exc:
            raise AdmissionError(
                f"{endpoint.resource}: GetPreferredAllocation failed: {rpc_detail(exc)}"
            ) from exc
        if not reply.container_responses:
            return []
        return list(reply.container_responses[0].deviceIDs)

    def run_options(self, pod: Pod, container: str) -> RunOptions:
        """What reaches the container: every resource's answer merged, as the kubelet
        does (first seen wins on a duplicate key, resources in random map order)."""
        merged = RunOptions()
        for allocation in self._shuffled(pod.allocations.get(container, [])):
            response = allocation.response
            for key, value in response.envs.items():
                merged.envs.setdefault(key, value)
            for key, value in response.annotations.items():
                merged.annotations.setdefault(key, value)
            for spec in response.devices:
                merged.devices.setdefault(spec.container_path, spec.host_path)
            for cdi in response.cdi_devices:
                if cdi.name not in merged.cdi_devices:
                    merged.cdi_devices.append(cdi.name)
        return merged

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
            self._kubelet.list_calls += 1
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
        # Like the kubelet, List shows app containers only, never init containers, and
        # one entry per device (per device and NUMA node on the kubelet).
        containers = [
            pr_pb2.ContainerResources(
                name=spec.name,
                devices=[
                    pr_pb2.ContainerDevices(resource_name=a.resource, device_ids=[device_id])
                    for a in pod.allocations.get(spec.name, [])
                    for device_id in a.device_ids
                ],
            )
            for spec in pod.containers
        ]
        return pr_pb2.PodResources(name=pod.name, namespace=pod.namespace, containers=containers)
