"""The operator's controls per node, per GPU and per group, through the real process
(issue 15 points 1-3): a node override drains a group on its node and not on another,
a drained GPU takes its groups out in every profile, a group sells its own seat count;
each applied by a live ConfigMap update as well as at start.

Each test runs on the selected topology (``KYB_TEST_TOPOLOGY``) without its scripted
faults, like test_live_ops."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import support
from tests.e2e.test_live import ConfigMapMount
from tests.e2e.test_live_ops import (
    INDICES,
    PAIRS,
    R1,
    R2,
    SEATS,
    devices,
    generation,
    group,
    needs_gpus,
    script,
    seats,
    state_groups,
    unhealthy,
)
from tests.e2e.test_serve import run_cli


def config(extra: str = "") -> str:
    return (
        f"profiles:\n  - resource: {R1}\n    seatsPerGroup: {SEATS[R1]}\n"
        f"  - resource: {R2}\n    seatsPerGroup: {SEATS[R2]}\n"
        f"allowOverprovision: true\n{extra}"
    )


def start(node: support.Node, mount: ConfigMapMount, *more: str) -> None:
    script(node)
    node.extra_args = ("--config", str(mount.path), *more)
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()


def status(node: support.Node) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((node.state_dir / "state.json").read_text())
    return doc


@pytest.fixture
def two_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[tuple[support.Node, ConfigMapMount]]]:
    """Two nodes of one pool, gpu-a (named by --node-name) and gpu-b (by KYB_NODE_NAME,
    as the DaemonSet's downward API sets it), reading the same ConfigMap text."""
    needs_gpus(1)
    nodes: list[tuple[support.Node, ConfigMapMount]] = []
    first = support.node()
    second = support.node()
    a, b = next(first), next(second)
    try:
        for node, name in ((a, "gpu-a"), (b, "gpu-b")):
            mount = ConfigMapMount(node.root)
            mount.publish(config(f"nodes:\n  gpu-a: {{drain: [{group(INDICES[0])}]}}\n"))
            if name == "gpu-b":
                monkeypatch.setenv("KYB_NODE_NAME", name)
                start(node, mount)
            else:
                start(node, mount, "--node-name", name)
            nodes.append((node, mount))
        yield nodes
    finally:
        for generator in (first, second):
            generator.close()


@pytest.mark.e2e
def test_a_node_override_drains_a_group_on_its_node_and_not_on_another(
    two_nodes: list[tuple[support.Node, ConfigMapMount]],
) -> None:
    (a, mount_a), (b, mount_b) = two_nodes
    drained = group(INDICES[0])
    assert a.kubelet.wait_for(lambda: unhealthy(a, R1) == seats(R1, drained), 5.0), a.log()
    assert not unhealthy(b, R1) and not unhealthy(b, R2), b.log()
    doc_a, doc_b = status(a), status(b)
    assert (doc_a["node"], doc_a["override"]) == ("gpu-a", {"drain": [drained]})
    assert doc_b["node"] == "gpu-b" and "override" not in doc_b
    assert doc_a["resources"][R1]["groups"][drained]["drainedWhy"] == (
        f"group {drained} is draining"
    )
    assert f'node gpu-a: override nodes.gpu-a in force: {{"drain":["{drained}"]}}' in a.log()
    assert "node gpu-b: no override for it in the config (nodes)" in b.log()

    # A ConfigMap update moves the override to gpu-b: each node follows live.
    text = config(f"nodes:\n  gpu-b: {{drain: [{drained}]}}\n")
    mount_a.publish(text)
    mount_b.publish(text)
    assert b.kubelet.wait_for(lambda: unhealthy(b, R1) == seats(R1, drained), 5.0), b.log()
    assert a.kubelet.wait_for(lambda: not unhealthy(a, R1), 5.0), a.log()
    assert "override" not in status(a) and status(b)["override"] == {"drain": [drained]}


@pytest.fixture
def live() -> Iterator[tuple[support.Node, ConfigMapMount]]:
    needs_gpus(1)
    for node in support.node():
        mount = ConfigMapMount(node.root)
        mount.publish(config())
        start(node, mount)
        yield node, mount


@pytest.mark.e2e
def test_a_drained_gpu_takes_its_groups_out_in_every_profile_and_keeps_held_seats(
    live: tuple[support.Node, ConfigMapMount],
) -> None:
    node, mount = live
    gpu = INDICES[-1]
    pair = next((p for p in PAIRS if gpu in p), None)
    on_gpu = {R1: group(gpu), **({R2: group(*pair)} if pair else {})}
    held = {r: f"{name}-s0" for r, name in on_gpu.items()}
    for resource, seat in held.items():
        assert generation(node, resource, seat) == "1"
    uuid = support.topology_of().gpu(gpu).uuid

    mount.publish(config(f"drainGpus: [{uuid}]\n"))
    want = {r: seats(r, name) - {held[r]} for r, name in on_gpu.items()}
    assert node.kubelet.wait_for(
        lambda: all(unhealthy(node, r) == want.get(r, set()) for r in (R1, R2)), 5.0
    ), node.log()
    for resource, name in on_gpu.items():
        shown = state_groups(node, resource)[name]
        assert shown["drained"] is True
        assert shown["drainedWhy"] == f"GPU {gpu} ({uuid}) is draining"
        assert {s: v["state"] for s, v in shown["seats"].items()} == {
            s: "held" if s == held[resource] else "drained" for s in seats(resource, name)
        }
        assert generation(node, resource, held[resource]) == "1"  # the holder keeps it
    # The same GPU by index, and the status command says why.
    mount.publish(config(f"drainGpus: [{gpu}]\n"))
    said = f"draining (GPU {gpu} ({uuid}) is draining)"
    assert support.wait_until(
        lambda: said in run_cli("status", "--state-dir", str(node.state_dir)).stdout, 5.0
    ), node.log()

    mount.publish(config())
    assert node.kubelet.wait_for(
        lambda: not unhealthy(node, R1) and not unhealthy(node, R2), 5.0
    ), node.log()


@pytest.mark.e2e
def test_a_groups_own_seat_count_is_served_and_lowering_it_keeps_held_seats(
    live: tuple[support.Node, ConfigMapMount],
) -> None:
    needs_gpus(2)
    node, mount = live
    big = tuple(INDICES[:2])
    mount.publish(
        config(f"groups:\n  - {{name: BIG, gpus: [{big[0]}, {big[1]}], seatsPerGroup: 5}}\n")
    )
    want = {f"BIG-s{k}" for k in range(5)}
    assert node.kubelet.wait_for(lambda: devices(node, R2) == want, 5.0), node.log()
    assert len(devices(node, R1)) == SEATS[R1] * len(INDICES)  # the 1x profile as it was
    assert generation(node, R2, "BIG-s4") == "1"

    mount.publish(
        config(f"groups:\n  - {{name: BIG, gpus: [{big[0]}, {big[1]}], seatsPerGroup: 2}}\n")
    )
    assert node.kubelet.wait_for(
        lambda: devices(node, R2) == {"BIG-s0", "BIG-s1", "BIG-s4"}, 5.0
    ), node.log()
    assert unhealthy(node, R2) == {"BIG-s4"}  # held, no longer configured: until released
    assert generation(node, R2, "BIG-s4") == "1"
