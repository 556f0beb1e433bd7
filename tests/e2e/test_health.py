"""GPU faults scripted in a mock topology drive the real process's health monitor."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e import support

# Brings its own topology (SPEC 8: tox runs it once, not per topology).
pytestmark = pytest.mark.own_topology

R1, R2 = "kyb.ai/gpu-1x-seat", "kyb.ai/gpu-2x-seat"


def unhealthy(node: support.Node, resource: str) -> set[str]:
    devices = node.kubelet.endpoints[resource].devices
    return {d for d, h in devices.items() if h != "Healthy"}


@pytest.fixture
def flaky() -> Iterator[support.Node]:
    # flaky-4: GPU 2 falls off the bus at 1.0 s and returns at 3.0 s; GPU 1 reports
    # XID 79 at 1.5 s. Probes every 200 ms, two good ones bring a GPU back.
    yield from support.node(
        topology="flaky-4",
        extra_args=("--health-probe-interval", "200ms", "--healthy-after-probes", "2"),
    )


def test_lost_gpu_and_critical_xid_turn_every_group_unhealthy_and_back(
    flaky: support.Node,
) -> None:
    node = flaky
    node.start_plugin()
    assert node.wait_registered((R1, R2)), node.log()
    started = time.monotonic()
    g2, g23 = {f"G2-s{k}" for k in range(4)}, {f"G23-s{k}" for k in range(3)}
    g1, g01 = {f"G1-s{k}" for k in range(4)}, {f"G01-s{k}" for k in range(3)}
    # Every group containing the GPU, in every profile.
    assert node.kubelet.wait_for(
        lambda: g2 <= unhealthy(node, R1) and g23 <= unhealthy(node, R2), 4.0
    ), node.log()
    # ... and only those: the other GPUs are healthy while GPU 2 is still off the bus.
    # (Under the real pynvml NVML fails every lookup by UUID meanwhile; and the XID wait
    # fails when GPU 2 goes, so every GPU may be unhealthy until its probes pass.)
    g0, g3 = {f"G0-s{k}" for k in range(4)}, {f"G3-s{k}" for k in range(4)}
    assert node.kubelet.wait_for(
        lambda: g2 <= unhealthy(node, R1) and not (g0 | g3) & unhealthy(node, R1), 4.0
    ), node.log()
    assert node.kubelet.wait_for(
        lambda: g1 <= unhealthy(node, R1) and g01 <= unhealthy(node, R2), 4.0
    ), node.log()
    # Both recover: the lost GPU after it returns, the XID one after its probes pass
    # with the driver's recovery action field reading "none" (flaky-4 scripts it so).
    assert node.kubelet.wait_for(
        lambda: not unhealthy(node, R1) and not unhealthy(node, R2), 8.0
    ), node.log()
    assert time.monotonic() - started < 8.0
    log = node.log()
    assert "unhealthy" in log and "critical XID 79" in log
    assert "healthy again" in log
