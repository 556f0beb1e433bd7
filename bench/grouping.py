"""Exact grouping time: 16 GPUs into pairs and quads."""

from __future__ import annotations

import itertools
import random
import time

from bench.node import topology_of
from bench.stats import Row, Target, median, row
from pkg.deviceplugin.topology import grouping
from pkg.deviceplugin.types import Gpu, Topology

QUAD = Target("< 100 ms", "value", "<", 100.0)
SECTION = "exact grouping, 16 GPUs (median of runs; worst in the JSON)"
WORDS = ["NV1", "NV2", "NV4", "NV12", "NV18", "PIX", "PXB", "PHB", "NODE", "SYS"]


def random_topology(count: int, rng: random.Random) -> Topology:
    gpus = [Gpu(i, f"GPU-{i}", "bench", 1, f"00000000:{i:02X}:00.0", i) for i in range(count)]
    words = {pair: rng.choice(WORDS) for pair in itertools.combinations(range(count), 2)}
    rows = [
        ["X" if a == b else words[(min(a, b), max(a, b))] for b in range(count)]
        for a in range(count)
    ]
    return Topology.from_matrix(gpus, rows)


def _time(topology: Topology, size: int) -> float:
    started = time.perf_counter()
    grouping.partition(topology, size)
    return (time.perf_counter() - started) * 1e3


def run(runs: int) -> list[Row]:
    rng = random.Random(2024)
    cases = {
        "nvswitch-16": [topology_of("nvswitch-16")] * runs,
        "random links": [random_topology(16, rng) for _ in range(runs)],
    }
    rows = []
    for name, topologies in cases.items():
        for size, label in ((2, "pairs"), (4, "quads")):
            times = [_time(t, size) for t in topologies]
            rows.append(
                row(
                    SECTION,
                    "16-GPU",
                    f"{name} into {label}",
                    median(times),
                    "ms",
                    target=QUAD if size == 4 else None,
                    samples=runs,
                    worst=max(times),
                )
            )
    return rows
