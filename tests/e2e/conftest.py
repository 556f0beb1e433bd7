from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e import support


@pytest.fixture
def node() -> Iterator[support.Node]:
    yield from support.node()


@pytest.fixture
def serving(node: support.Node) -> support.Node:
    """The plugin started with the default config, every profile registered."""
    node.start_plugin()
    assert node.wait_registered(RESOURCES), node.log()
    return node


RESOURCES = ("kyb.ai/gpu-1x-seat", "kyb.ai/gpu-2x-seat")
