"""The kubelet simulator behaves like the real device manager (k8s.io/kubernetes v1.37.2).

Each test pins one behaviour the conformance harness saw in, or read from, the real
manager (``conformance/kubelet/README.md``, "Where the real manager differs"), so that
the fast end-to-end tests built on the simulator stay truthful. The plugin here is a
small recording servicer over a real Unix socket; the simulator speaks real gRPC.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.api.podresources.v1 import api_pb2 as pr_pb2
from pkg.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc
from pkg.deviceplugin.kubeletsim.simulator import (
    AdmissionError,
    ContainerSpec,
    KubeletSimulator,
)
from pkg.deviceplugin.server import registration
from pkg.deviceplugin.types import ResourceName

RESOURCE = ResourceName("example.com/thing")
SOCKET = "thing.sock"
DEVICES = [f"d{i}" for i in range(6)]


@dataclass
class RecordingPlugin(api_pb2_grpc.DevicePluginServicer):
    """A device plugin that records what the kubelet asks and answers as scripted."""

    devices: list[str] = field(default_factory=lambda: list(DEVICES))
    preferred: list[str] | None = None  # None: prefer the first ones offered
    preferred_error: bool = False
    options_asked: int = 0
    streams: int = 0
    preferred_requests: list[api_pb2.ContainerPreferredAllocationRequest] = field(
        default_factory=list
    )
    allocate_requests: list[list[str]] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        self.options_asked += 1
        return api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        self.streams += 1
        yield api_pb2.ListAndWatchResponse(
            devices=[api_pb2.Device(ID=d, health="Healthy") for d in self.devices]
        )
        while context.is_active() and not self.stopped.wait(0.05):
            pass

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        container = request.container_requests[0]
        self.preferred_requests.append(container)
        if self.preferred_error:
            context.abort(grpc.StatusCode.INTERNAL, "no preference today")
        if self.preferred is not None:
            chosen = self.preferred
        else:
            must = list(container.must_include_deviceIDs)
            rest = sorted(d for d in container.available_deviceIDs if d not in must)
            chosen = must + rest[: container.allocation_size - len(must)]
        return api_pb2.PreferredAllocationResponse(
            container_responses=[api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen)]
        )

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        ids = list(request.container_requests[0].devices_ids)
        self.allocate_requests.append(ids)
        return api_pb2.AllocateResponse(
            container_responses=[
                api_pb2.ContainerAllocateResponse(envs={"IDS": ",".join(sorted(ids))})
            ]
        )

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()  # never asked: its options do not require it


@dataclass
class World:
    root: Path
    kubelet: KubeletSimulator
    plugin: RecordingPlugin
    server: grpc.Server | None = None

    def serve_plugin(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.plugin, server)
        server.add_insecure_port(f"unix://{self.root / 'dp' / SOCKET}")
        server.start()
        self.server = server

    def stop_plugin(self) -> None:
        self.plugin.stopped.set()
        assert self.server is not None
        self.server.stop(grace=None)
        self.server = None

    def register(self, timeout_s: float = 5.0) -> None:
        registration.register(self.root / "dp" / "kubelet.sock", RESOURCE, SOCKET, timeout_s)

    def healthy(self) -> list[str]:
        return self.kubelet.healthy(RESOURCE)

    def wait_devices(self, healthy: int) -> bool:
        return self.kubelet.wait_for(lambda: len(self.healthy()) == healthy, 5.0)


@pytest.fixture
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="kyb-sim-", dir="/tmp"))
    kubelet = KubeletSimulator(root / "dp", root / "pr" / "kubelet.sock", seed=7)
    kubelet.start()
    w = World(root, kubelet, RecordingPlugin())
    try:
        yield w
    finally:
        if w.server is not None:
            w.stop_plugin()
        kubelet.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_register_dials_the_plugin_back_before_it_answers(world: World) -> None:
    world.serve_plugin()
    world.register()
    # Synchronous, as the real manager: the options were asked inside Register.
    assert world.plugin.options_asked == 1
    assert RESOURCE in world.kubelet.endpoints
    assert world.wait_devices(len(DEVICES))


def test_register_fails_when_the_plugin_does_not_serve_its_socket(world: World) -> None:
    # The kubelet's blocking dial retries until the caller's deadline (or its own 10 s).
    with pytest.raises(registration.RegistrationError, match=r"DEADLINE_EXCEEDED|failed to dial"):
        world.register(timeout_s=1.0)
    assert world.kubelet.wait_for(lambda: world.kubelet.registers_in_flight == 0, 5.0)
    assert RESOURCE not in world.kubelet.endpoints
    assert any("failed to dial" in e for e in world.kubelet.register_errors)


def test_register_validates_version_and_resource_name(world: World) -> None:
    with (
        grpc.insecure_channel(f"unix://{world.root / 'dp' / 'kubelet.sock'}") as channel,
        pytest.raises(grpc.RpcError) as bad_name,
    ):
        api_pb2_grpc.RegistrationStub(channel).Register(
            api_pb2.RegisterRequest(version="v1beta1", endpoint=SOCKET, resource_name="gpu"),
            timeout=5,
        )
    assert bad_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_second_register_is_refused_and_the_kubelet_loses_track_of_the_plugin(
    world: World,
) -> None:
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    with pytest.raises(registration.RegistrationError, match="already connected"):
        world.register()
    # The refusal dropped the live connection's record: the plugin going away goes
    # unnoticed (devices stay Healthy), and the socket is refused from now on.
    world.stop_plugin()
    world.plugin = RecordingPlugin()
    world.serve_plugin()
    with pytest.raises(registration.RegistrationError, match="already connected"):
        world.register()
    assert world.healthy() == sorted(DEVICES)
    # Only a kubelet restart clears it. The new kubelet knows the resource from its
    # checkpoint, with no device until the plugin registers again.
    world.kubelet.restart()
    assert world.kubelet.endpoints[RESOURCE].devices == {}
    assert not world.kubelet.endpoints[RESOURCE].connected
    world.serve_plugin()  # the restart wiped the plugin's socket
    world.register()
    assert world.wait_devices(len(DEVICES))


def test_a_lost_stream_marks_every_device_unhealthy_and_is_never_reconnected(
    world: World,
) -> None:
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    world.kubelet.disconnect(RESOURCE)
    assert world.wait_devices(0)
    assert set(world.kubelet.endpoints[RESOURCE].devices) == set(DEVICES)  # capacity kept
    with pytest.raises(AdmissionError, match="no device plugin registered"):
        world.kubelet.admit("p", [ContainerSpec("main", {RESOURCE: 1})])
    assert world.plugin.allocate_requests == []
    assert world.plugin.streams == 1
    # Registering again is how the plugin comes back.
    world.register()
    assert world.wait_devices(len(DEVICES))
    assert world.kubelet.endpoints[RESOURCE].registrations == 2


def test_preferred_allocation_is_asked_even_for_every_free_device_and_ids_come_shuffled(
    world: World,
) -> None:
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    orders = set()
    for round_ in range(6):
        pod = world.kubelet.admit(f"p{round_}", [ContainerSpec("main", {RESOURCE: 6})])
        assert sorted(pod.allocations["main"][0].device_ids) == sorted(DEVICES)
        orders.add(tuple(world.plugin.allocate_requests[-1]))
        world.kubelet.delete(f"p{round_}")
    # Without a NUMA hint the manager asks even when the request takes everything.
    assert len(world.plugin.preferred_requests) == 6
    assert all(r.allocation_size == 6 for r in world.plugin.preferred_requests)
    assert len(orders) > 1, "Allocate always saw the same order; Go set order is random"


def test_reused_init_devices_are_in_available_and_must_include(world: World) -> None:
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    pod = world.kubelet.admit(
        "p",
        containers=[ContainerSpec("main", {RESOURCE: 2})],
        init_containers=[ContainerSpec("init", {RESOURCE: 1})],
    )
    (init,) = pod.allocations["init"]
    (main,) = pod.allocations["main"]
    assert set(init.device_ids) < set(main.device_ids)
    request = world.plugin.preferred_requests[-1]
    assert list(request.must_include_deviceIDs) == init.device_ids
    assert set(init.device_ids) <= set(request.available_deviceIDs)
    assert request.allocation_size == 2
    # The app container's Allocate repeats the init container's ID.
    assert set(init.device_ids) <= set(world.plugin.allocate_requests[-1])


def test_a_short_or_wrong_preference_is_filled_from_the_rest(world: World) -> None:
    world.plugin.preferred = ["d3", "nonexistent"]
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    pod = world.kubelet.admit("p", [ContainerSpec("main", {RESOURCE: 3})])
    ids = pod.allocations["main"][0].device_ids
    assert len(ids) == 3 and "d3" in ids and set(ids) <= set(DEVICES)


def test_a_failing_preference_fails_the_admission(world: World) -> None:
    world.plugin.preferred_error = True
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    with pytest.raises(AdmissionError, match="GetPreferredAllocation failed"):
        world.kubelet.admit("p", [ContainerSpec("main", {RESOURCE: 1})])
    assert world.plugin.allocate_requests == []
    assert ("default", "p") not in world.kubelet.pods


def test_pod_resources_list_has_one_entry_per_device_and_no_init_containers(
    world: World,
) -> None:
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    world.kubelet.admit(
        "p",
        containers=[ContainerSpec("main", {RESOURCE: 3})],
        init_containers=[ContainerSpec("init", {RESOURCE: 1})],
    )
    with grpc.insecure_channel(f"unix://{world.kubelet.pod_resources_socket}") as channel:
        listed = pr_grpc.PodResourcesListerStub(channel).List(
            pr_pb2.ListPodResourcesRequest(), timeout=5
        )
    (pod,) = listed.pod_resources
    assert [c.name for c in pod.containers] == ["main"]
    entries = pod.containers[0].devices
    assert len(entries) == 3
    assert all(len(e.device_ids) == 1 and e.resource_name == RESOURCE for e in entries)


def test_a_container_with_two_resources_sees_one_answer_per_duplicate_key(
    world: World,
) -> None:
    world.serve_plugin()
    world.register()
    # Register returns before the first device list has come over ListAndWatch
    assert world.wait_devices(len(DEVICES))
    other = RecordingPlugin(devices=["o0", "o1"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_DevicePluginServicer_to_server(other, server)
    server.add_insecure_port(f"unix://{world.root / 'dp' / 'other.sock'}")
    server.start()
    try:
        registration.register(
            world.root / "dp" / "kubelet.sock", ResourceName("example.com/other"), "other.sock"
        )
        assert world.kubelet.wait_for(
            lambda: len(world.kubelet.healthy("example.com/other")) == 2, 5.0
        )
        seen = set()
        for round_ in range(8):
            pod = world.kubelet.admit(
                f"p{round_}", [ContainerSpec("main", {RESOURCE: 1, "example.com/other": 1})]
            )
            answers = {a.response.envs["IDS"] for a in pod.allocations["main"]}
            merged = world.kubelet.run_options(pod, "main").envs["IDS"]
            assert merged in answers and len(answers) == 2
            seen.add(merged[0])
            world.kubelet.delete(f"p{round_}")
        # Either resource's answer may win: the kubelet's map order is random.
        assert seen == {"d", "o"}
    finally:
        other.stopped.set()
        server.stop(grace=None)


def _listed(world: World) -> list[str]:
    with grpc.insecure_channel(f"unix://{world.kubelet.pod_resources_socket}") as channel:
        reply = pr_grpc.PodResourcesListerStub(channel).List(
            pr_pb2.ListPodResourcesRequest(), timeout=5
        )
    return sorted(p.name for p in reply.pod_resources)


@pytest.mark.parametrize("plugin_back_first", [True, False], ids=["back-first", "back-late"])
def test_a_restart_readmits_running_pods_and_kills_init_holders_without_healthy_devices(
    world: World, plugin_back_first: bool
) -> None:
    """As the kubelet binary did (conformance/kubelet/README.md, "The real kubelet
    binary"): List shows no pod until the re-admission; a running app container is let
    be, an exited init container's devices are checked again and need a registered,
    healthy resource by then (kubernetes issues 124345, 138446)."""
    world.serve_plugin()
    world.register()
    assert world.wait_devices(len(DEVICES))
    world.kubelet.admit("app-only", containers=[ContainerSpec("main", {RESOURCE: 1})])
    world.kubelet.admit(
        "with-init",
        containers=[ContainerSpec("main", {RESOURCE: 1})],
        init_containers=[ContainerSpec("init", {RESOURCE: 1})],
    )
    assert _listed(world) == ["app-only", "with-init"]

    world.kubelet.restart(readmit_after_s=0.5 if plugin_back_first else 0.0)
    if plugin_back_first:
        assert _listed(world) == []  # answers before its pods are back
        world.serve_plugin()  # the restart wiped the plugin's socket
        world.register()
        assert world.wait_devices(len(DEVICES))
    assert world.kubelet.wait_readmitted()
    if plugin_back_first:
        assert _listed(world) == ["app-only", "with-init"]
        assert world.kubelet.killed == {}
    else:
        assert _listed(world) == ["app-only"]
        assert world.kubelet.killed == {
            ("default", "with-init"): (
                f"no healthy devices present; cannot allocate unhealthy devices {RESOURCE}"
            )
        }
