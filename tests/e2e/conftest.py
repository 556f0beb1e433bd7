from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.e2e import support

RESOURCES = ("kyb.ai/gpu-1x-seat", "kyb.ai/gpu-2x-seat")
# The tests of a restarted kubelet's re-admission race run on each of these topologies in
# one session (tox env kubelet-race); elsewhere on the selected one.
RACE_TOPOLOGIES = os.environ.get("KYB_RACE_TOPOLOGIES", support.TOPOLOGY).split()


@pytest.fixture
def node() -> Iterator[support.Node]:
    yield from support.node()


@pytest.fixture
def serving(node: support.Node) -> support.Node:
    """The plugin started with the default config, every profile registered."""
    return serve(node)


def serve(node: support.Node) -> support.Node:
    """Start the plugin with the default config and wait until every profile is
    registered.

    On a topology with scripted faults, the script is played out first (with quick
    probes) so that the tests using this fixture see a steady, healthy node.
    """
    script_end = support.fault_script_end(node.topology)
    if script_end:
        node.extra_args = (
            *node.extra_args,
            "--health-probe-interval",
            "200ms",
            "--healthy-after-probes",
            "1",
        )
    started = time.monotonic()
    node.start_plugin()
    assert node.wait_registered(RESOURCES), node.log()
    if script_end:
        time.sleep(max(0.0, started + script_end + 0.5 - time.monotonic()))
        assert node.kubelet.wait_for(
            lambda: all(
                len(node.kubelet.healthy(r)) == len(node.kubelet.endpoints[r].devices)
                for r in RESOURCES
            ),
            5.0,
        ), node.log()
    return node


@pytest.fixture(params=RACE_TOPOLOGIES)
def serving_each(request: pytest.FixtureRequest) -> Iterator[support.Node]:
    """``serving`` on each topology of ``KYB_RACE_TOPOLOGIES``."""
    nodes = support.node(topology=request.param)
    try:
        yield serve(next(nodes))
    finally:
        nodes.close()
