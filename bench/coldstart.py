"""Cold start: plugin process start to every profile registered with the kubelet.

Each run gets a fresh state directory and a fresh kubelet simulator process that is
already serving ``kubelet.sock``; the clock runs from just before the plugin process is
spawned to the moment the simulator has every profile registered with a first device
list (it reports that moment on the shared CLOCK_MONOTONIC). The baseline is the
interpreter's own start: ``python -c pass``, run the same number of times.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.node import REPO, Node
from bench.stats import Row, Target, median, row

TARGET = Target("< 1.5 s", "value", "<", 1.5)
SECTION = "cold start: process start -> every profile registered (median)"


def interpreter_start(runs: int, code: str = "pass") -> list[float]:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
        times.append(time.monotonic() - started)
    return times


def run(nodes: dict[str, str], runs: int) -> list[Row]:
    bare = interpreter_start(runs)
    grpc_import = interpreter_start(runs, "import grpc")
    rows = [
        row(
            SECTION,
            "-",
            "python -c 'import grpc'",
            median(grpc_import),
            "s",
            baseline=median(bare),
            baseline_name="python -c pass",
            samples=runs,
        )
    ]
    for node_name, fixture in nodes.items():
        times = []
        for _ in range(runs):
            with Node(fixture, prefix="kyb-bench-cold-") as node:
                times.append(node.start())
        rows.append(
            row(
                SECTION,
                node_name,
                "plugin registered",
                median(times),
                "s",
                baseline=median(bare),
                baseline_name="python -c pass",
                target=TARGET,
                samples=runs,
                worst=max(times),
            )
        )
    return rows
