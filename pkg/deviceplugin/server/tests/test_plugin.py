"""One profile's device-plugin service, called over real gRPC on a real Unix socket.

The seat board behind it is the real one (the seed's layout on four GPUs in NVLink
pairs) with a test clock; PodResources is a stand-in whose answer each test sets.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import GONE_CONFIRM_S
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import R1, R2, Clock, seed_layout
from pkg.deviceplugin.allocator.views import DeviceView
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2
from pkg.deviceplugin.server.plugin import MAX_STREAMS, SeatPlugin, device_message
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.server.tests.support import (
    ENDED,
    PodResourcesServer,
    ServedPlugin,
    health,
    pod,
    short_dir,
    wait_until,
)
from pkg.deviceplugin.types import DeviceId, ResourceName, socket_name_of

GRACE_S = 60.0
SEATS_1X = {f"G{g}-s{k}" for g in range(4) for k in range(4)}
SEATS_2X = {f"G{pair}-s{k}" for pair in ("01", "23") for k in range(3)}


class Recorded:
    """A metrics recorder that keeps what it was told."""

    def __init__(self) -> None:
        self.allocates: list[tuple[str, bool]] = []
        self.preferred: list[str] = []

    def observe_allocate(self, resource: str, seconds: float, ok: bool) -> None:
        assert seconds >= 0
        self.allocates.append((resource, ok))

    def observe_preferred(self, resource: str, seconds: float) -> None:
        assert seconds >= 0
        self.preferred.append(resource)

    def registered(self, resource: str, first: bool) -> None:
        raise AssertionError("a plugin does not register")

    def config_reload(self, accepted: bool) -> None:
        raise AssertionError("a plugin does not reload")


@dataclass
class Node:
    root: Path
    board: SeatBoard
    clock: Clock
    pod_resources: PodResourcesServer
    recorded: Recorded = field(default_factory=Recorded)
    stream_changes: int = 0
    served: dict[ResourceName, ServedPlugin] = field(default_factory=dict)
    clients: list[PodResourcesClient] = field(default_factory=list)

    def serve(self, resource: ResourceName, *, pod_resources: bool = True) -> ServedPlugin:
        client = None
        if pod_resources:
            client = PodResourcesClient(self.pod_resources.path, timeout_s=2.0)
            self.clients.append(client)
        plugin = SeatPlugin(
            resource,
            self.board,
            client,
            self.recorded,
            on_streams=self._streams_changed,
            dev_root=self.root / "dev",
        )
        served = ServedPlugin(plugin, self.root / socket_name_of(resource))
        self.served[resource] = served
        return served

    def _streams_changed(self) -> None:
        self.stream_changes += 1

    def state(self, resource: ResourceName, seat: str) -> str:
        return self.board.seat_views(resource)[DeviceId(seat)].state

    def shutdown(self) -> None:
        for served in self.served.values():
            served.stop()
        for client in self.clients:
            client.close()
        self.pod_resources.stop()
        self.board.close()


MakeNode = Callable[..., Node]


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    made: list[Node] = []

    def make(policy: Policy | None = None, lost_ledger: bool = False) -> Node:
        root = short_dir()
        clock = Clock()
        store = None
        if lost_ledger:
            # The state directory was used before (its topology cache is there) but
            # the state file is gone: the board must rebuild from PodResources.
            (root / "state").mkdir()
            (root / "state" / "topology.json").write_text("{}")
            store = StateStore(root / "state", used_before="topology.json")
        board = SeatBoard(
            seed_layout(),
            policy or Policy(),
            store,
            release_grace_s=GRACE_S,
            clock=clock,
            monotonic=clock,
        )
        node = Node(root, board, clock, PodResourcesServer(root / "pr.sock").start())
        made.append(node)
        return node

    yield make
    for node in made:
        node.shutdown()
        shutil.rmtree(node.root, ignore_errors=True)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# ---- options, PreStartContainer, the device message -----------------------------------


def test_options_offer_preferred_allocation_without_prestart_and_each_ask_is_counted(
    make_node: MakeNode,
) -> None:
    served = make_node().serve(R1)
    assert isinstance(served.plugin, SeatPlugin)
    for asked in (1, 2):
        options = served.stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
        assert options.get_preferred_allocation_available
        assert not options.pre_start_required
        assert served.plugin.options_asked == asked
    reply = served.stub.PreStartContainer(
        api_pb2.PreStartContainerRequest(devices_ids=["G0-s0"]), timeout=5
    )
    assert reply == api_pb2.PreStartContainerResponse()


def test_a_device_shows_its_numa_nodes_and_no_topology_where_none_is_known() -> None:
    placed = device_message(DeviceView(DeviceId("G01-s0"), True, (0, 1)))
    assert (placed.ID, placed.health) == ("G01-s0", "Healthy")
    assert [n.ID for n in placed.topology.nodes] == [0, 1]
    unplaced = device_message(DeviceView(DeviceId("G0-s0"), False, ()))
    assert unplaced.health == "Unhealthy"
    # an empty TopologyInfo would tell the kubelet "no NUMA node" rather than "unknown"
    assert not unplaced.HasField("topology")


# ---- ListAndWatch ----------------------------------------------------------------------


def test_the_first_list_is_every_seat_of_its_own_profile_healthy_on_its_numa_node(
    make_node: MakeNode,
) -> None:
    node = make_node()
    first = node.serve(R2).watch().message()
    assert set(health(first)) == SEATS_2X
    assert set(health(first).values()) == {"Healthy"}
    numa = {d.ID: [n.ID for n in d.topology.nodes] for d in first.devices}
    assert all(numa[f"G01-s{k}"] == [0] and numa[f"G23-s{k}"] == [1] for k in range(3))
    assert set(health(node.serve(R1).watch().message())) == SEATS_1X


def test_a_held_seat_streams_the_overlapping_seats_of_another_profile_unhealthy_until_released(
    make_node: MakeNode,
) -> None:
    node = make_node(Policy(allow_overprovision=False))
    one, two = node.serve(R1), node.serve(R2)
    watch = two.watch()
    watch.message()
    one.allocate(["G0-s0"])
    fenced = health(watch.message())
    assert {s for s, h in fenced.items() if h == "Unhealthy"} == {"G01-s0", "G01-s1", "G01-s2"}
    assert all(fenced[f"G23-s{k}"] == "Healthy" for k in range(3))
    # never seen in PodResources within the grace period: released, the fence lifts
    node.clock.now += GRACE_S + 1
    node.board.reconcile({})
    assert set(health(watch.message()).values()) == {"Healthy"}


def test_a_change_of_only_another_profiles_seats_sends_nothing_on_this_stream(
    make_node: MakeNode,
) -> None:
    node = make_node(Policy(allow_overprovision=False))
    one, two = node.serve(R1), node.serve(R2)
    watch = one.watch()
    first = health(watch.message())
    fences = two.watch()
    fences.message()
    # a held 1x seat is as healthy as a free one; only the 2x seats on GPU 0 change,
    # and every stream wakes for that
    one.allocate(["G0-s0"])
    assert "Unhealthy" in health(fences.message()).values()
    assert watch.quiet_for(0.3)
    gpu2 = node.board.layout.seat(R1, DeviceId("G2-s0"))
    assert gpu2 is not None
    node.board.set_unhealthy({gpu2.group.gpus[0].uuid: "XID 79"})
    sick = health(watch.message())
    assert {s for s, h in sick.items() if h != first[s]} == {f"G2-s{k}" for k in range(4)}


def test_a_stream_beyond_the_limit_ends_the_oldest_and_keeps_the_newest(
    make_node: MakeNode,
) -> None:
    node = make_node()
    served = node.serve(R1)
    plugin = served.plugin
    assert isinstance(plugin, SeatPlugin)
    watches = []
    for _ in range(MAX_STREAMS + 1):
        watches.append(served.watch())
        watches[-1].message()
    assert watches[0].next() == ENDED
    assert all(w.quiet_for(0.05) for w in watches[1:])
    assert plugin.streams_opened == MAX_STREAMS + 1
    assert plugin.streams_active == MAX_STREAMS
    assert not plugin.stream_open(1)
    assert all(plugin.stream_open(n) for n in range(2, MAX_STREAMS + 2))
    # one report per stream opened; the evicted one's end was already counted
    assert node.stream_changes == MAX_STREAMS + 1


def test_a_stream_the_client_cancels_stops_counting_as_open_and_is_reported(
    make_node: MakeNode,
) -> None:
    node = make_node()
    served = node.serve(R1)
    plugin = served.plugin
    assert isinstance(plugin, SeatPlugin)
    watch = served.watch()
    watch.message()
    assert plugin.streams_active == 1 and node.stream_changes == 1
    watch.cancel()
    assert wait_until(lambda: plugin.streams_active == 0)
    assert not plugin.stream_open(1)
    assert wait_until(lambda: node.stream_changes == 2)


@pytest.mark.parametrize("how", ["the plugin stops", "the board closes"])
def test_every_open_stream_ends_at_once_when(make_node: MakeNode, how: str) -> None:
    node = make_node()
    served = node.serve(R1)
    plugin = served.plugin
    assert isinstance(plugin, SeatPlugin)
    watches = [served.watch() for _ in range(2)]
    for watch in watches:
        watch.message()
    # nothing more comes: each stream now waits for a change of the board
    assert all(watch.quiet_for(0.1) for watch in watches)
    if how == "the plugin stops":
        plugin.stop()
    else:
        node.board.close()
    # well within the 30 s safety-net poll: the end wakes the streams
    assert [w.next(timeout_s=3) for w in watches] == [ENDED, ENDED]
    assert wait_until(lambda: plugin.streams_active == 0)


# ---- Allocate --------------------------------------------------------------------------


def test_allocate_answers_each_container_its_seats_envs_annotations_and_rw_device_nodes(
    make_node: MakeNode,
) -> None:
    node = make_node(Policy(allow_overprovision=True))
    reply = node.serve(R1).allocate(["G0-s0"], ["G3-s1", "G2-s2"])
    first, second = reply.container_responses
    assert first.envs["KYB_GPU_SEAT"] == "G0-s0"
    assert first.envs["KYB_RESOURCE"] == R1
    assert first.envs["KYB_SEAT_GEN"] == "1"
    assert first.annotations["kyb.ai/gpu-seat"] == "G0-s0"
    assert [(d.container_path, d.host_path, d.permissions) for d in first.devices] == [
        ("/dev/nvidia10", "/dev/nvidia10", "rw"),
        ("/dev/nvidiactl", "/dev/nvidiactl", "rw"),
    ]
    assert list(first.cdi_devices) == []
    assert second.envs["KYB_GPU_SEAT"] == "G2-s2,G3-s1"
    assert second.envs["KYB_GPU_INDICES"] == "2,3"
    assert second.envs["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert [d.host_path for d in second.devices] == [
        "/dev/nvidia12",
        "/dev/nvidia13",
        "/dev/nvidiactl",
    ]
    assert {node.state(R1, s) for s in ("G0-s0", "G3-s1", "G2-s2")} == {"held"}


def test_allocate_under_the_cdi_strategy_names_cdi_devices_and_no_device_nodes(
    make_node: MakeNode,
) -> None:
    node = make_node(Policy(device_list_strategy="cdi"))
    [answer] = node.serve(R2).allocate(["G23-s0"]).container_responses
    assert [d.name for d in answer.cdi_devices] == [
        "nvidia.com/gpu=GPU-00000002-aaaa-bbbb-cccc-dddddddddddd",
        "nvidia.com/gpu=GPU-00000003-aaaa-bbbb-cccc-dddddddddddd",
    ]
    assert list(answer.devices) == []
    assert answer.envs["KYB_GPU_SEAT"] == "G23-s0"


def test_allocate_of_an_unknown_seat_is_invalid_argument_and_binds_nothing(
    make_node: MakeNode,
) -> None:
    node = make_node()
    served = node.serve(R1)
    error = rpc_error(lambda: served.allocate(["G0-s0"], ["G9-s9"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "G9-s9" in str(error.details())
    # all or nothing: the valid container's seat was not bound either
    assert node.state(R1, "G0-s0") == "free"
    assert node.recorded.allocates == [(R1, False)]


@pytest.mark.parametrize(
    "containers", [(), ([],)], ids=["no container request", "a container with no IDs"]
)
def test_allocate_of_nothing_is_invalid_argument(
    make_node: MakeNode, containers: tuple[list[str], ...]
) -> None:
    served = make_node().serve(R1)
    error = rpc_error(lambda: served.allocate(*containers))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_allocate_of_a_seat_fenced_by_another_profile_is_failed_precondition_saying_why(
    make_node: MakeNode,
) -> None:
    node = make_node(Policy(allow_overprovision=False))
    node.serve(R1).allocate(["G1-s0"])
    two = node.serve(R2)
    error = rpc_error(lambda: two.allocate(["G01-s2"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "G01-s2 is fenced" in str(error.details())
    assert node.state(R2, "G01-s2") == "fenced"
    # the other pair is untouched
    assert two.allocate(["G23-s0"]).container_responses[0].envs["KYB_GPU_SEAT"] == "G23-s0"


def test_only_an_allocate_of_a_fenced_seat_asks_podresources_first(make_node: MakeNode) -> None:
    node = make_node(Policy(allow_overprovision=False))
    calls = node.pod_resources.fake
    one, two = node.serve(R1), node.serve(R2)
    one.allocate(["G0-s0"])
    two.allocate(["G23-s0"])
    assert calls.calls == 0  # free seats: the ledger alone decides
    rpc_error(lambda: two.allocate(["G01-s0"]))
    assert calls.calls == 1


def test_a_fenced_seat_is_allocated_once_podresources_shows_its_blocker_gone(
    make_node: MakeNode,
) -> None:
    node = make_node(Policy(allow_overprovision=False))
    node.serve(R1).allocate(["G0-s0"])
    two = node.serve(R2)
    # PodResources never showed the 1x seat's pod; past the grace period the Allocate's
    # own look at PodResources releases it, and the fence with it
    node.clock.now += GRACE_S + 1
    [answer] = two.allocate(["G01-s0"]).container_responses
    assert answer.envs["KYB_GPU_SEAT"] == "G01-s0"
    assert node.pod_resources.fake.calls == 1
    # released; now the 2x seat on its GPUs fences it in turn
    assert node.state(R1, "G0-s0") == "fenced"


def test_a_fenced_seat_whose_blocker_podresources_still_shows_stays_refused(
    make_node: MakeNode,
) -> None:
    node = make_node(Policy(allow_overprovision=False))
    node.serve(R1).allocate(["G0-s0"])
    node.pod_resources.fake.pods = [pod("ml", "trainer", {"main": {R1: ["G0-s0"]}})]
    node.clock.now += GRACE_S + 1
    error = rpc_error(lambda: node.serve(R2).allocate(["G01-s0"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert node.state(R1, "G0-s0") == "held"


def test_allocate_after_a_lost_ledger_is_unavailable_until_podresources_answered_twice(
    make_node: MakeNode,
) -> None:
    node = make_node(lost_ledger=True)
    served = node.serve(R1)
    first = rpc_error(lambda: served.allocate(["G0-s0"]))
    assert first.code() == grpc.StatusCode.UNAVAILABLE
    assert "PodResources" in str(first.details())
    node.clock.now += GONE_CONFIRM_S
    [answer] = served.allocate(["G0-s0"]).container_responses
    assert answer.envs["KYB_GPU_SEAT"] == "G0-s0"
    assert node.pod_resources.fake.calls == 2


@pytest.mark.parametrize("pod_resources", ["not answering", "not configured"])
def test_allocate_after_a_lost_ledger_without_podresources_stays_unavailable(
    make_node: MakeNode, pod_resources: str
) -> None:
    node = make_node(lost_ledger=True)
    node.pod_resources.stop()
    served = node.serve(R1, pod_resources=pod_resources == "not answering")
    for _ in range(2):
        error = rpc_error(lambda: served.allocate(["G0-s0"]))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        node.clock.now += GONE_CONFIRM_S
    assert node.state(R1, "G0-s0") == "free"


def test_every_allocate_and_preferred_answer_is_recorded_with_its_outcome(
    make_node: MakeNode,
) -> None:
    node = make_node()
    served = node.serve(R2)
    served.allocate(["G01-s0"])
    rpc_error(lambda: served.allocate(["nope"]))
    served.stub.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(), timeout=5)
    assert node.recorded.allocates == [(R2, True), (R2, False)]
    assert node.recorded.preferred == [R2]


# ---- GetPreferredAllocation ------------------------------------------------------------


def preferred_request(
    *containers: tuple[list[str], list[str], int],
) -> api_pb2.PreferredAllocationRequest:
    return api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available,
                must_include_deviceIDs=must,
                allocation_size=size,
            )
            for available, must, size in containers
        ]
    )


def test_preferred_allocation_answers_each_container_from_its_available_seats_must_includes_first(
    make_node: MakeNode,
) -> None:
    stub = make_node().serve(R1).stub
    reply = stub.GetPreferredAllocation(
        preferred_request(
            (["G0-s0", "G0-s1", "G1-s0", "G1-s1"], ["G1-s1"], 2),
            (["not-a-seat", "G3-s2"], [], 2),
        ),
        timeout=5,
    )
    first, second = (list(r.deviceIDs) for r in reply.container_responses)
    # spread: the must-include, then a seat of a group not chosen yet
    assert first == ["G1-s1", "G0-s0"]
    # never an ID that is not a seat of this profile, even to make up the size
    assert second == ["G3-s2"]


def test_a_negative_allocation_size_is_invalid_argument(make_node: MakeNode) -> None:
    stub = make_node().serve(R1).stub
    error = rpc_error(
        lambda: stub.GetPreferredAllocation(preferred_request((["G0-s0"], [], -1)), timeout=5)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
