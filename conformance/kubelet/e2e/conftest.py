from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.kubelet.e2e import harness

_names = itertools.count()


@pytest.fixture(scope="session")
def work() -> Path:
    why = harness.why_not_here()
    if why is not None:
        pytest.skip(f"the real kubelet does not start here: {why}")
    return Path(os.environ["KYB_E2E_WORK"])


@pytest.fixture
def make_node(work: Path) -> Iterator[Callable[..., harness.Node]]:
    """Makes the test's node (one per test): fake CRI and kubelet started, plugin not."""
    made: list[harness.Node] = []

    def make(**kw: Any) -> harness.Node:
        node = harness.new_node(work, f"n{next(_names)}", **kw)
        made.append(node)
        node.start_cri()
        node.start_kubelet()
        return node

    yield make
    for node in made:
        node.close()
