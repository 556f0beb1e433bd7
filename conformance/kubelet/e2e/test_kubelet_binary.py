"""The real plugin process under the real kubelet binary (issue 16).

Pods are static pods; what the tests check is what an operator or a container sees:
the kubelet's PodResources answers and ``/pods``, the CreateContainer requests that
reached the container runtime (the fake CRI's record), and the plugin's ``status``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance.kubelet.e2e import harness
from conformance.kubelet.e2e.harness import Created, Node, pod_manifest
from pkg.deviceplugin.nvml import topofile
from tests.e2e import support

ONE_X, TWO_X = harness.RESOURCES
MakeNode = Callable[..., Node]
ONE_SEAT = ("--profiles", "[{resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 1}]")
SEAT_ENVS = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_VISIBLE_DEVICES",
    "KYB_RESOURCE",
    "KYB_GPU_SEAT",
    "KYB_GPU_GROUP",
    "KYB_SEAT_GEN",
    "KYB_GPU_INDICES",
    "KYB_GPU_UUIDS",
)


def plan_ids(plan: dict[str, Any]) -> dict[str, set[str]]:
    return {
        r: {seat for g in v["groups"].values() for seat in g["seats"]}
        for r, v in plan["resources"].items()
    }


def bus_key(pci_bus_id: str) -> tuple[int, ...]:
    domain, bus, rest = pci_bus_id.split(":")
    device, function = rest.split(".")
    return tuple(int(x, 16) for x in (domain, bus, device, function))


def check_binding(
    c: Created, plan: dict[str, Any], topology: str, resource: str, cdi: bool
) -> None:
    """SPEC section 4, as the container runtime received it."""
    gpus = {g.index: g for g in support.topology_of(topology).gpus}
    groups = plan["resources"][resource]["groups"]
    seats = c.envs["KYB_GPU_SEAT"].split(",")
    names = c.envs["KYB_GPU_GROUP"].split(",")
    assert len(names) == len(seats) == len(c.envs["KYB_SEAT_GEN"].split(",")), c.envs
    mine = sorted(
        {i for n in names for i in groups[n]["gpus"]}, key=lambda i: bus_key(gpus[i].pci_bus_id)
    )
    where = f"{c.pod}/{c.container}"
    # The container sees only its GPUs, numbered from 0 in PCI bus order.
    assert c.envs["CUDA_VISIBLE_DEVICES"] == ",".join(str(k) for k in range(len(mine))), where
    assert c.envs["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID", where
    assert c.envs["KYB_GPU_INDICES"] == ",".join(str(i) for i in mine), where
    uuids = ",".join(gpus[i].uuid for i in mine)
    assert c.envs["NVIDIA_VISIBLE_DEVICES"] == c.envs["KYB_GPU_UUIDS"] == uuids, where
    assert c.envs["KYB_RESOURCE"] == resource, where
    kyb = {k: v for k, v in c.annotations.items() if k.startswith("kyb.ai/")}
    assert kyb == {
        "kyb.ai/resource": resource,
        "kyb.ai/gpu-seat": c.envs["KYB_GPU_SEAT"],
        "kyb.ai/gpu-group": c.envs["KYB_GPU_GROUP"],
        "kyb.ai/seat-gen": c.envs["KYB_SEAT_GEN"],
        "kyb.ai/gpu-indices": c.envs["KYB_GPU_INDICES"],
        "kyb.ai/gpu-uuids": c.envs["KYB_GPU_UUIDS"],
    }, where
    gpu_nodes = {d[0] for d in c.devices if d[0].removeprefix("/dev/nvidia").isdigit()}
    if cdi:
        assert c.cdi and all("/" in name and "=" in name for name in c.cdi), (where, c.cdi)
        assert len(c.cdi) == len(mine), (where, c.cdi)
        assert not gpu_nodes, (where, c.devices)
    else:
        assert not c.cdi, (where, c.cdi)
        assert gpu_nodes == {f"/dev/nvidia{gpus[i].minor}" for i in mine}, (where, c.devices)
        assert all(host == path and perms == "rw" for host, path, perms in c.devices), where


def generation(c: Created) -> int:
    gens = {int(g) for g in c.envs["KYB_SEAT_GEN"].split(",")}
    assert len(gens) == 1, c.envs
    return gens.pop()


def start_registered(node: Node) -> dict[str, set[str]]:
    """Starts the plugin; returns the plan's seats once the kubelet offers them all."""
    ids = plan_ids(node.report("plan"))
    node.start_plugin()
    got = node.wait_allocatable({r: len(v) for r, v in ids.items()})
    assert got is not None, f"allocatable {node.allocatable_or_none()}, want {ids}\n{node.logs()}"
    return ids


def test_every_profile_registers(make_node: MakeNode) -> None:
    node = make_node()
    ids = start_registered(node)
    assert node.allocatable() == {r: v for r, v in ids.items() if v}, node.logs()
    assert len(ids[ONE_X]) == 32 and len(ids[TWO_X]) == 12  # dgx-a100's defaults
    # Capacity and allocatable as the kubelet's device manager counts them.
    counts = {r: (len(v), len(v)) for r, v in ids.items()}
    assert harness.wait_until(lambda: node.device_counts() == counts, 5), node.device_counts()


@pytest.mark.parametrize("strategy", ["envvar", "cdi"])
def test_init_and_app_container_get_one_seat(make_node: MakeNode, strategy: str) -> None:
    node = make_node(plugin_args=("--device-list-strategy", strategy))
    start_registered(node)
    plan = node.report("plan")
    node.add_pod(pod_manifest("a", TWO_X, seats=1, init_seats=1))
    node.wait_phase("a", "Running")
    got = node.wait_created("a", ["init", "app"])
    init, app = got["init"], got["app"]
    for c in (init, app):
        check_binding(c, plan, node.topology, TWO_X, cdi=strategy == "cdi")
    assert {k: init.envs[k] for k in SEAT_ENVS} == {k: app.envs[k] for k in SEAT_ENVS}
    assert (init.devices, init.cdi) == (app.devices, app.cdi)
    assert generation(app) == 1
    # The kubelet lists the app container with the seat, never the init container.
    listed = node.pod_devices()
    assert listed.get((f"a-{harness.NODE_NAME}", "app")) == {TWO_X: {app.envs["KYB_GPU_SEAT"]}}
    assert (f"a-{harness.NODE_NAME}", "init") not in listed


def run_pods(node: Node, names: list[str], lifetime: float, pause: float, **pod: Any) -> list[int]:
    """Each pod admitted, kept ``lifetime`` s after Running, deleted, then ``pause`` s
    before the next: the generations their app containers got."""
    gens = []
    for name in names:
        node.add_pod(pod_manifest(name, ONE_X, **pod))
        node.wait_phase(name, "Running")
        got = node.wait_created(name, ["app"])
        if "init_seats" in pod:
            init = node.wait_created(name, ["init"])["init"]
            assert generation(init) == generation(got["app"]), (init.envs, got["app"].envs)
        gens.append(generation(got["app"]))
        time.sleep(lifetime)
        node.delete_pod(name)
        time.sleep(pause)
    return gens


def test_short_lived_pods_get_rising_generations(make_node: MakeNode) -> None:
    """One seat; no PodResources reconcile between pods (1 h), so only the hand-off
    window (500 ms) can tell a new holder from the init-to-app hand-off."""
    node = make_node(
        topology="single-gpu",
        plugin_args=(*ONE_SEAT, "--reconcile-interval", "1h", "--handoff-window", "500ms"),
    )
    start_registered(node)
    gens = run_pods(node, ["a", "b", "c"], lifetime=0, pause=0.6)
    gens += run_pods(node, ["d", "e"], lifetime=0, pause=0.6, init_seats=1)
    assert gens == sorted(set(gens)) and gens[0] == 1, f"generations {gens}\n{node.logs()}"


def test_long_lived_pods_get_rising_generations(make_node: MakeNode) -> None:
    """One seat; each pod lives past a reconcile (200 ms) and the next is admitted at
    once, well inside the hand-off window (default 2 s): the plugin saw the holder in
    List, so a repeat Allocate is a new holder."""
    node = make_node(
        topology="single-gpu", plugin_args=(*ONE_SEAT, "--reconcile-interval", "200ms")
    )
    start_registered(node)
    gens = run_pods(node, ["a", "b", "c"], lifetime=1.0, pause=0)
    assert gens == [1, 2, 3], f"generations {gens}\n{node.logs()}"


def test_fencing_is_visible_to_the_kubelet(make_node: MakeNode) -> None:
    """A held 2x seat fences the 1x seats of its GPUs: the kubelet's allocatable drops.
    The fence lifts when the holder goes: a holder the plugin saw in List once it is
    missing from two answers 2 s apart; one deleted before any List saw it (the
    kubelet's List is the plugin's only evidence) after the release grace period."""
    grace = 4.0
    node = make_node(
        plugin_args=(
            "--allow-overprovision",
            "false",
            "--reconcile-interval",
            "200ms",
            "--release-grace-period",
            f"{grace:g}s",
        )
    )
    ids = start_registered(node)
    plan = node.report("plan")

    def fenced_by(app: Created) -> set[str]:
        held = set(plan["resources"][TWO_X]["groups"][app.envs["KYB_GPU_GROUP"]]["gpus"])
        return {
            seat
            for g in plan["resources"][ONE_X]["groups"].values()
            if held & set(g["gpus"])
            for seat in g["seats"]
        }

    for pod in ("seen", "unseen"):
        node.add_pod(pod_manifest(pod, TWO_X))
        fenced = fenced_by(node.wait_created(pod, ["app"])["app"])
        assert fenced
        if pod == "seen":
            node.wait_phase(pod, "Running")
            time.sleep(1.0)  # five reconcile passes: List shows it
        else:
            # deleted as soon as its container exists: a List between then and now
            # would see it (CI once did, when the fence was awaited first)
            deleted = time.monotonic()
            node.delete_pod(pod)
        got = node.wait_allocatable({ONE_X: len(ids[ONE_X]) - len(fenced)}, timeout=10)
        assert got is not None and got[ONE_X] == ids[ONE_X] - fenced, f"{got}\n{node.logs()}"
        if pod == "seen":
            deleted = time.monotonic()
            node.delete_pod(pod)
        assert node.wait_allocatable({ONE_X: len(ids[ONE_X])}, timeout=grace + 6) is not None, (
            node.logs()
        )
        took = time.monotonic() - deleted
        print(f"fence of {pod} holder lifted {took:.2f} s after its deletion")
        if pod == "unseen":
            assert took >= grace - 1.5, f"lifted {took:.2f} s after deletion, grace {grace}"


def restart_timeline(node: Node, offset: int, pod: str) -> dict[str, float]:
    """From the restarted kubelet's own log: when it served ``kubelet.sock``, re-admitted
    ``pod``, and first had each profile's devices (seconds of the day)."""
    seen: dict[str, float] = {}
    for t, line in node.kubelet_log_at(offset):
        if "Starting device plugin registration server" in line:
            seen.setdefault("serving", t)
        elif '"SyncLoop ADD"' in line and f"default/{pod}-{harness.NODE_NAME}" in line:
            seen.setdefault("admitted", t)
        elif "Processed device updates for resource" in line:
            for r in harness.RESOURCES:
                if f'resourceName="{r}"' in line:
                    seen.setdefault(r, t)
    return seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("init", [False, True], ids=["app", "init+app"])
def test_kubelet_restart_keeps_the_pod_and_its_seat(
    make_node: MakeNode, sig: int, init: bool
) -> None:
    """A restarted kubelet re-admits its running pods. An app container found running
    is let be, but an init container's seat (exited, not running) is checked again, and
    the pod is refused, and killed, if the profile has no healthy device by then
    (kubernetes issues 124345, 138446): the plugin must register first."""
    node = make_node(plugin_args=("--reconcile-interval", "200ms"))
    start_registered(node)
    plan = node.report("plan")
    node.add_pod(pod_manifest("a", TWO_X, seats=1, init_seats=1 if init else None))
    node.wait_phase("a", "Running")
    before = node.wait_created("a", ["app"])["app"]
    seat = before.envs["KYB_GPU_SEAT"]
    # Held seats fence others: what the kubelet offers with "a" running.
    offered = {r: len(v) for r, v in node.allocatable().items()}
    created = len(node.created())

    node.stop_kubelet(sig)
    offset = node.kubelet_log_size()
    node.start_kubelet()
    assert node.wait_allocatable(offered, timeout=10) is not None, node.logs()
    times = wait_until_all(
        lambda: restart_timeline(node, offset, "a"), ("serving", "admitted", *harness.RESOURCES)
    )
    registered = max(times[r] for r in harness.RESOURCES)
    back, admitted = registered - times["serving"], times["admitted"] - times["serving"]
    print(
        f"kubelet restart ({signal.Signals(sig).name}): every profile back {back * 1000:.0f} ms "
        f"after kubelet.sock was served, the pod re-admitted after {admitted * 1000:.0f} ms"
    )
    assert back < 1.0, f"every profile back {back:.2f} s after the kubelet served\n{node.logs()}"
    assert admitted > back or not init, (
        f"the kubelet re-admitted the pod before every profile was back: {times}"
    )

    # Restored from the kubelet's checkpoint and the runtime: no new container, no
    # new Allocate, the same seat and generation.
    node.wait_phase("a", "Running")
    time.sleep(0.5)  # a reconcile of the plugin's, and a kubelet housekeeping pass
    assert node.phase("a") == "Running", node.logs()
    assert node.pod_devices()[(f"a-{harness.NODE_NAME}", "app")] == {TWO_X: {seat}}
    assert len(node.created()) == created
    status = node.seats(TWO_X)[seat]
    assert status["generation"] == generation(before) and status["state"] != "free", status

    node.add_pod(pod_manifest("b", TWO_X))
    node.wait_phase("b", "Running")
    b = node.wait_created("b", ["app"])["app"]
    check_binding(b, plan, node.topology, TWO_X, cdi=False)
    assert b.envs["KYB_GPU_SEAT"] != seat


def wait_until_all(read: Callable[[], dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    got = harness.wait_until(lambda: (v := read()) and all(k in v for k in keys) and v, 5)
    assert got, f"want {keys} in the kubelet's log, got {read()}"
    return got  # type: ignore[no-any-return]


def test_plugin_sigkill_keeps_the_binding(make_node: MakeNode) -> None:
    node = make_node(
        topology="single-gpu", plugin_args=(*ONE_SEAT, "--reconcile-interval", "200ms")
    )
    start_registered(node)
    node.add_pod(pod_manifest("a", ONE_X))
    node.wait_phase("a", "Running")
    a = node.wait_created("a", ["app"])["app"]
    assert generation(a) == 1

    node.stop_plugin(signal.SIGKILL)
    # The kubelet marks the resource's devices unhealthy when the stream ends.
    assert node.wait_allocatable({ONE_X: 0}, timeout=10) is not None, node.logs()
    node.start_plugin()
    assert node.wait_allocatable({ONE_X: 1}, timeout=20) is not None, node.logs()
    node.wait_phase("a", "Running")
    seat = node.seats(ONE_X)[a.envs["KYB_GPU_SEAT"]]
    assert seat["generation"] == 1 and seat["state"] != "free", seat

    # Not a clean stop: journal lines could have been lost without a trace, so the next
    # generation is the first above the reservation (every one handed out is below it).
    reserved = json.loads((node.state_dir / "generations.json").read_text())["reserved"]
    assert reserved > 1
    node.delete_pod("a")
    node.add_pod(pod_manifest("b", ONE_X))
    node.wait_phase("b", "Running")
    b = node.wait_created("b", ["app"])["app"]
    assert b.envs["KYB_GPU_SEAT"] == a.envs["KYB_GPU_SEAT"], b.envs
    assert generation(b) == reserved + 1, b.envs


def test_more_seats_than_healthy_are_refused(make_node: MakeNode, tmp_path: Path) -> None:
    """GPU 2 lost 3 s after the plugin's start: its pair's 2x seats turn Unhealthy, and
    a pod asking for every seat the node has is refused at admission; the plugin stays
    up and serves the next pod."""
    lost = support.write_topology(
        tmp_path / "lost.yaml", [topofile.Fault(gpu=2, at=3, kind="lost")], base="dgx-a100"
    )
    node = make_node(topology=str(lost), plugin_args=("--health-probe-interval", "200ms"))
    ids = start_registered(node)
    plan = node.report("plan")
    total = len(ids[TWO_X])
    sick = {
        s for g in plan["resources"][TWO_X]["groups"].values() if 2 in g["gpus"] for s in g["seats"]
    }
    assert sick
    healthy = node.wait_allocatable({TWO_X: total - len(sick)}, timeout=20)
    assert healthy is not None and healthy[TWO_X] == ids[TWO_X] - sick, node.logs()
    # The kubelet's capacity keeps them; only its allocatable drops.
    assert harness.wait_until(
        lambda: node.device_counts().get(TWO_X) == (total, total - len(sick)), 5
    ), node.device_counts()

    node.add_pod(pod_manifest("big", TWO_X, seats=total))
    pod = node.wait_phase("big", "Failed")
    assert pod["status"]["reason"] == "UnexpectedAdmissionError", pod["status"]
    assert f"Requested: {total}, Available: {total - len(sick)}" in pod["status"]["message"], pod[
        "status"
    ]
    assert not node.created("big")

    assert node.plugin is not None and node.plugin.poll() is None, node.logs()
    node.add_pod(pod_manifest("small", TWO_X))
    node.wait_phase("small", "Running")
    small = node.wait_created("small", ["app"])["app"]
    assert small.envs["KYB_GPU_SEAT"] in healthy[TWO_X]
