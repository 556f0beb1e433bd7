"""Live operation of the real process: drain and overprovisioning changed under held
seats, GPUs appearing and disappearing across topology refreshes, and structured logs.

Each test runs on the selected topology (``KYB_TEST_TOPOLOGY``) with its scripted faults
replaced by the test's own, so that flaky-4 behaves like any 4-GPU node here.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from pkg.deviceplugin.nvml.topofile import Fault
from pkg.deviceplugin.topology import grouping
from tests.e2e import support
from tests.e2e.test_live import ConfigMapMount, _free_port, _scrape

R1, R2 = "kyb.ai/gpu-1x-seat", "kyb.ai/gpu-2x-seat"
SEATS = {R1: 4, R2: 3}
TOPOLOGY = support.topology_of()
INDICES = TOPOLOGY.indices
PAIRS = grouping.partition(TOPOLOGY, 2)


def config(*, overprovision: bool, drain: Sequence[str] = ()) -> str:
    return (
        f"profiles:\n  - resource: {R1}\n    seatsPerGroup: {SEATS[R1]}\n"
        f"  - resource: {R2}\n    seatsPerGroup: {SEATS[R2]}\n"
        f"allowOverprovision: {str(overprovision).lower()}\n"
        f"drain: [{', '.join(drain)}]\n"
    )


def group(*members: int) -> str:
    return grouping.group_name(members)


def seats(resource: str, name: str) -> set[str]:
    return {f"{name}-s{k}" for k in range(SEATS[resource])}


def lost(gpu: int, at: float, back_after: float | None = None) -> Fault:
    """``gpu`` falls off the bus ``at`` seconds after start, for good without ``back_after``."""
    return Fault(gpu=gpu, at=at, kind="lost", recover_after=back_after)


def xid(gpu: int, at: float, number: int) -> Fault:
    return Fault(gpu=gpu, at=at, kind="xid", xid=number)


def script(node: support.Node, *faults: Fault) -> None:
    """Run ``node`` on the selected GPUs with ``faults`` as their only scripted faults."""
    node.topology = str(support.write_topology(node.root / "topology.yaml", faults))


def needs_gpus(count: int) -> None:
    if len(INDICES) < count:
        pytest.skip(f"topology {support.TOPOLOGY} has fewer than {count} GPU(s)")


def unhealthy(node: support.Node, resource: str) -> set[str]:
    return {d for d, h in node.kubelet.endpoints[resource].devices.items() if h != "Healthy"}


def devices(node: support.Node, resource: str) -> set[str]:
    return set(node.kubelet.endpoints[resource].devices)


def state_groups(node: support.Node, resource: str) -> dict[str, Any]:
    doc = json.loads((node.state_dir / "state.json").read_text())
    groups: dict[str, Any] = doc["resources"][resource]["groups"]
    return groups


def refused(node: support.Node, resource: str, seat: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        support.allocate(support.plugin_stub(node, resource), [seat])
    return caught.value


def generation(node: support.Node, resource: str, seat: str) -> str:
    """The seat's generation for its holder: from the state file while it is held (a
    repeat Allocate later than the hand-off window would be a new holder), else what
    an Allocate binding it now answers."""
    for body in state_groups(node, resource).values():
        entry = body["seats"].get(seat)
        if entry is not None and entry.get("binding"):
            return str(entry["binding"]["generation"])
    reply = support.allocate(support.plugin_stub(node, resource), [seat])
    return reply.envs["KYB_SEAT_GEN"]


def pair_of(gpu: int) -> tuple[int, ...] | None:
    """The 2x group's GPUs that ``gpu`` is in; None on a node without one."""
    return next((p for p in PAIRS if gpu in p), None)


def hold_on(node: support.Node, gpu: int, seat_1x: int, seat_2x: int) -> dict[str, str]:
    """Bind a seat of ``gpu``'s 1x group and, where it has one, of its 2x group (each
    checked as a first binding); returns the seat per resource."""
    pair = pair_of(gpu)
    held = {R1: f"{group(gpu)}-s{seat_1x}"}
    if pair is not None:
        held[R2] = f"{group(*pair)}-s{seat_2x}"
    for resource, seat in held.items():
        assert generation(node, resource, seat) == "1", node.log()
    return held


def seats_on(gpu: int) -> dict[str, set[str]]:
    """Every seat, per profile, of the groups containing ``gpu``."""
    pair = pair_of(gpu)
    return {R1: seats(R1, group(gpu)), R2: seats(R2, group(*pair)) if pair else set()}


@dataclass
class Live:
    node: support.Node
    mount: ConfigMapMount
    metrics_port: int


@pytest.fixture
def live() -> Iterator[Live]:
    """The plugin on a fault-free copy of the topology, config from a ConfigMap mount,
    metrics on, every profile registered."""
    needs_gpus(1)
    port = _free_port()
    for node in support.node():
        script(node)
        mount = ConfigMapMount(node.root)
        mount.publish(config(overprovision=True))
        node.extra_args = ("--config", str(mount.path), "--metrics-address", f"127.0.0.1:{port}")
        node.start_plugin()
        assert node.wait_registered((R1, R2)), node.log()
        yield Live(node, mount, port)


@pytest.mark.e2e
def test_live_drain_stops_offering_free_seats_keeps_held_ones_and_undrain_brings_them_back(
    live: Live,
) -> None:
    node = live.node
    # A 1x group and, where the node has one, a 2x group: each with one held seat.
    drained = {R1: group(INDICES[0])}
    if PAIRS:
        drained[R2] = group(*PAIRS[0])
    held = {r: f"{name}-s0" for r, name in drained.items()}
    for resource, seat in held.items():
        assert generation(node, resource, seat) == "1"
    everything = {r: devices(node, r) for r in (R1, R2)}

    live.mount.publish(config(overprovision=True, drain=sorted(drained.values())))
    want = {r: seats(r, name) - {held[r]} for r, name in drained.items()}
    assert node.kubelet.wait_for(
        lambda: all(unhealthy(node, r) == want.get(r, set()) for r in (R1, R2)), 5.0
    ), node.log()
    # Nothing is renamed or dropped; only the drained groups' free seats go.
    assert {r: devices(node, r) for r in (R1, R2)} == everything
    error = refused(node, R1, f"{drained[R1]}-s1")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "drain" in str(error.details())
    # The held seat keeps its binding: the same IDs get the same generation.
    assert generation(node, R1, held[R1]) == "1"
    shown = state_groups(node, R1)[drained[R1]]
    assert shown["drained"] is True
    assert {s: v["state"] for s, v in shown["seats"].items()} == {
        seat: "held" if seat == held[R1] else "drained" for seat in seats(R1, drained[R1])
    }
    text = _scrape(live.metrics_port)
    for resource, name in drained.items():
        labels = f'group="{name}",resource="{resource}"'
        assert f'kyb_seats{{{labels},state="drained"}} {SEATS[resource] - 1}.0' in text
        assert f'kyb_seats{{{labels},state="held"}} 1.0' in text

    live.mount.publish(config(overprovision=True))
    assert node.kubelet.wait_for(
        lambda: not unhealthy(node, R1) and not unhealthy(node, R2), 5.0
    ), node.log()
    assert state_groups(node, R1)[drained[R1]]["drained"] is False
    assert f'group="{drained[R1]}",resource="{R1}",state="drained"}} 0.0' in _scrape(
        live.metrics_port
    )
    assert generation(node, R1, f"{drained[R1]}-s1") == "1"
    # Text is the default log format, with the event's context in brackets.
    log = node.log()
    assert not log.lstrip().startswith("{")
    bound = (
        rf"seat bound \[resource={R1} group={drained[R1]} seat={held[R1]} gpus=\d+ generation=1\]"
    )
    assert re.search(bound, log), log


@pytest.mark.e2e
def test_sighup_turning_overprovisioning_off_fences_overlapping_groups_and_on_again_unfences(
    node: support.Node,
) -> None:
    needs_gpus(2)
    pair = PAIRS[0]
    g2, singles = group(*pair), [group(i) for i in pair]
    script(node)
    node.config_text = config(overprovision=True)
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    config_file = node.root / "config.yaml"
    # Overlapping seats of both profiles held at once: allowed while overprovisioning.
    held = {R1: f"{singles[0]}-s0", R2: f"{g2}-s0"}
    for resource, seat in held.items():
        assert generation(node, resource, seat) == "1"
    assert node.kubelet.wait_for(lambda: not unhealthy(node, R1) and not unhealthy(node, R2), 2.0)

    config_file.write_text(config(overprovision=False))
    assert node.process is not None
    node.process.send_signal(signal.SIGHUP)
    # Each held seat fences the other profile's groups sharing its GPUs; held seats stay.
    fenced = {
        R1: (seats(R1, singles[0]) | seats(R1, singles[1])) - {held[R1]},
        R2: seats(R2, g2) - {held[R2]},
    }
    assert node.kubelet.wait_for(
        lambda: unhealthy(node, R1) == fenced[R1] and unhealthy(node, R2) == fenced[R2], 5.0
    ), node.log()
    error = refused(node, R2, f"{g2}-s1")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fenced" in str(error.details())
    assert generation(node, R2, held[R2]) == "1"
    assert state_groups(node, R1)[singles[1]]["fenced"] is True

    config_file.write_text(config(overprovision=True))
    node.process.send_signal(signal.SIGHUP)
    assert node.kubelet.wait_for(
        lambda: not unhealthy(node, R1) and not unhealthy(node, R2), 5.0
    ), node.log()
    assert generation(node, R2, f"{g2}-s1") == "1"
    # the config watch may have reloaded before the SIGHUP was handled: wait for its line
    assert support.wait_until(lambda: "config reload requested" in node.log(), 5.0), node.log()


@pytest.mark.e2e
def test_a_gpu_that_appears_at_a_topology_refresh_gets_groups_and_seats_without_moving_held_ones(
    node: support.Node,
) -> None:
    needs_gpus(1)
    late = INDICES[-1]
    before = [i for i in INDICES if i != late]
    # The last GPU is off the bus at start and comes back after 5 s (time enough to
    # register and hold a seat first, even on a busy machine).
    script(node, lost(late, 0.0, 5.0))
    node.extra_args = ("--refresh-interval", "250ms")
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    first = {r: devices(node, r) for r in (R1, R2)}
    assert first[R1] == {s for i in before for s in seats(R1, group(i))}, node.log()
    assert len(first[R2]) == len(before) // 2 * SEATS[R2]
    held = sorted(first[R2])[0] if first[R2] else None
    fenced: set[str] = set()
    if held is not None:
        assert generation(node, R2, held) == "1"
        members = state_groups(node, R2)[held.rsplit("-", 1)[0]]["gpus"]
        fenced = {s for i in members for s in seats(R1, group(i))}

    assert node.kubelet.wait_for(
        lambda: len(devices(node, R1)) == len(INDICES) * SEATS[R1], 10.0
    ), node.log()
    assert devices(node, R1) == first[R1] | seats(R1, group(late))
    assert node.kubelet.wait_for(
        lambda: len(devices(node, R2)) == len(INDICES) // 2 * SEATS[R2], 2.0
    ), node.log()
    # Healthy, but for the held 2x seat's fencing of its GPUs' 1x groups.
    assert node.kubelet.wait_for(
        lambda: unhealthy(node, R1) == fenced and not unhealthy(node, R2), 5.0
    ), node.log()
    if held is not None:
        # The group under a workload is neither renamed nor regrouped.
        assert held in devices(node, R2)
        assert generation(node, R2, held) == "1"
    assert generation(node, R1, f"{group(late)}-s0") == "1"
    assert f"GPU {late} appeared [gpu={late}]" in node.log()


@pytest.mark.e2e
def test_a_gpu_lost_under_a_held_seat_keeps_its_groups_unhealthy_until_it_returns(
    node: support.Node,
) -> None:
    needs_gpus(1)
    gpu = INDICES[0]
    # GPU 0 falls off the bus 5 s after start (time enough to register and hold seats
    # first, even on a busy machine), for 3 s; topology refreshes run meanwhile.
    script(node, lost(gpu, 5.0, 3.0))
    node.extra_args = (
        "--refresh-interval",
        "250ms",
        "--health-probe-interval",
        "200ms",
        "--healthy-after-probes",
        "2",
    )
    node.config_text = config(overprovision=True)
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    held = hold_on(node, gpu, seat_1x=0, seat_2x=1)
    everything = {r: devices(node, r) for r in (R1, R2)}
    # Every group containing the GPU, in every profile, held seats included; no other.
    sick = seats_on(gpu)
    assert node.kubelet.wait_for(
        lambda: all(unhealthy(node, r) == sick[r] for r in (R1, R2)), 8.0
    ), node.log()
    assert {r: devices(node, r) for r in (R1, R2)} == everything
    # A reload regroups what it may meanwhile: not the held groups, nor the GPU's others.
    assert node.process is not None
    node.process.send_signal(signal.SIGHUP)
    assert support.wait_until(lambda: "config reloaded" in node.log(), 5.0), node.log()
    assert {r: devices(node, r) for r in (R1, R2)} == everything
    assert all(unhealthy(node, r) == sick[r] for r in (R1, R2))
    shown = state_groups(node, R1)[group(gpu)]
    assert shown["health"] == "Unhealthy"
    assert shown["seats"][held[R1]]["binding"]["generation"] == 1
    error = refused(node, R1, f"{group(gpu)}-s1")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

    assert node.kubelet.wait_for(
        lambda: not unhealthy(node, R1) and not unhealthy(node, R2), 8.0
    ), node.log()
    assert {r: devices(node, r) for r in (R1, R2)} == everything
    for resource, seat in held.items():
        assert generation(node, resource, seat) == "1"
    log = node.log()
    assert f"GPU {gpu} (" in log and "healthy again" in log
    assert f"GPU {gpu} appeared" not in log


@pytest.mark.e2e
def test_a_plugin_restarted_while_a_held_gpu_is_off_the_bus_keeps_its_groups_from_the_cache(
    node: support.Node,
) -> None:
    needs_gpus(1)
    gpu = INDICES[-1]
    script(node)
    node.extra_args = ("--health-probe-interval", "200ms", "--healthy-after-probes", "1")
    node.config_text = config(overprovision=True)
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    held = hold_on(node, gpu, seat_1x=1, seat_2x=0)
    everything = {r: devices(node, r) for r in (R1, R2)}
    before = {r: node.kubelet.endpoints[r].registrations for r in (R1, R2)}
    assert node.stop_plugin() == 0

    # The plugin comes back while the GPU is off the bus; the GPU returns 4 s later.
    script(node, lost(gpu, 0.0, 4.0))
    node.start_plugin()
    assert node.wait_registered((R1, R2), after=before), node.log()
    sick = seats_on(gpu)
    assert {r: devices(node, r) for r in (R1, R2)} == everything
    assert node.kubelet.wait_for(
        lambda: all(unhealthy(node, r) == sick[r] for r in (R1, R2)), 3.0
    ), node.log()
    assert "keeping it from the topology cache" in node.log()
    shown = state_groups(node, R1)[group(gpu)]
    assert shown["seats"][held[R1]]["binding"]["generation"] == 1

    assert node.kubelet.wait_for(
        lambda: not unhealthy(node, R1) and not unhealthy(node, R2), 10.0
    ), node.log()
    assert {r: devices(node, r) for r in (R1, R2)} == everything
    for resource, seat in held.items():
        assert generation(node, resource, seat) == "1"


@pytest.mark.e2e
def test_a_gpu_off_the_bus_at_start_does_not_hide_the_other_gpus_critical_xids(
    node: support.Node,
) -> None:
    needs_gpus(2)
    gone, sick = INDICES[-1], INDICES[0]
    script(node, lost(gone, 0.0), xid(sick, 2.0, 79))
    node.config_text = config(overprovision=True)
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    assert group(gone) + "-s0" not in devices(node, R1)
    assert node.kubelet.wait_for(lambda: seats(R1, group(sick)) <= unhealthy(node, R1), 8.0), (
        node.log()
    )
    assert "critical XID 79" in node.log()


@pytest.mark.e2e
def test_json_log_format_writes_one_object_per_line_with_each_events_context(
    node: support.Node,
) -> None:
    needs_gpus(1)
    gpu = INDICES[0]
    script(node, lost(gpu, 2.0, 1.0))
    node.extra_args = (
        "--log-format",
        "json",
        "--health-probe-interval",
        "200ms",
        "--healthy-after-probes",
        "1",
    )
    node.config_text = config(overprovision=False)
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    # this GPU's line: a failed XID wait (mocklib: NVML's, when the GPU goes) makes every
    # GPU unhealthy until its probes pass, so others may be healthy again earlier
    assert support.wait_until(
        lambda: (
            f"GPU {gpu} (" in node.log()
            and any(
                f"GPU {gpu} (" in line and "healthy again" in line
                for line in node.log().splitlines()
            )
        ),
        10.0,
    ), node.log()
    seat = f"{group(gpu)}-s0"
    assert generation(node, R1, seat) == "1"
    assert refused(node, R1, "G99-s0").code() == grpc.StatusCode.INVALID_ARGUMENT
    assert node.process is not None
    node.process.send_signal(signal.SIGHUP)
    assert support.wait_until(lambda: "config reloaded" in node.log(), 5.0), node.log()
    assert node.stop_plugin() == 0

    lines = node.log().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    for record in records:
        assert {"time", "level", "msg"} <= record.keys(), record
        assert record["level"] in {"debug", "info", "warning", "error", "critical"}

    def find(text: str, **context: object) -> dict[str, Any]:
        for record in records:
            if text in record["msg"] and context.items() <= record.items():
                found: dict[str, Any] = record
                return found
        raise AssertionError(f"no {text!r} line with {context} in:\n" + "\n".join(lines))

    for resource in (R1, R2):
        find("registered with the kubelet", resource=resource)
        find("serving on", resource=resource)
    find("seat bound", resource=R1, group=group(gpu), seat=seat, gpus=[gpu], generation=1)
    assert find("Allocate refused", resource=R1)["level"] == "warning"
    assert find(" unhealthy: ", gpu=gpu)["level"] == "warning"
    assert find("healthy again", gpu=gpu)["level"] == "info"
    find("config reloaded")
    find("stopped")


@pytest.mark.e2e
def test_a_live_log_format_change_applies_at_once_and_a_new_metrics_address_waits_for_a_restart(
    node: support.Node,
) -> None:
    needs_gpus(1)
    script(node)
    node.config_text = config(overprovision=True)
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    changed = f"logFormat: json\nmetricsAddress: 127.0.0.1:{_free_port()}\n"
    (node.root / "config.yaml").write_text(config(overprovision=True) + changed)
    assert node.process is not None
    node.process.send_signal(signal.SIGHUP)
    assert support.wait_until(lambda: '"config reloaded' in node.log(), 5.0), node.log()
    seat = f"{group(INDICES[0])}-s0"
    assert generation(node, R1, seat) == "1"
    assert node.stop_plugin() == 0
    lines = node.log().splitlines()
    switched = next(i for i, line in enumerate(lines) if line.startswith("{"))
    assert any("registered with the kubelet" in line for line in lines[:switched])
    records = [json.loads(line) for line in lines[switched:]]
    assert {r["msg"] for r in records if r["level"] == "warning"} == {
        "config key metricsAddress changed; it takes effect after a restart"
    }
    assert any(r["msg"] == "seat bound" and r.get("seat") == seat for r in records)
