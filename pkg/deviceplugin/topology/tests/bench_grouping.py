"""Time the exact grouping on 16 GPUs.

Run from the repository root: ``python -m pkg.deviceplugin.topology.tests.bench_grouping``.

The search visits the same states whatever the links are, so random link words serve;
the worst of several runs is what matters for a node's startup.
"""

from __future__ import annotations

import itertools
import random
import time

from pkg.deviceplugin.topology import grouping
from pkg.deviceplugin.types import Gpu, Topology

WORDS = ["NV1", "NV2", "NV4", "NV12", "NV18", "PIX", "PXB", "PHB", "NODE", "SYS"]


def random_topology(count: int, rng: random.Random) -> Topology:
    gpus = [Gpu(i, f"GPU-{i}", "bench", 1, f"00000000:{i:02X}:00.0", i) for i in range(count)]
    words = {pair: rng.choice(WORDS) for pair in itertools.combinations(range(count), 2)}
    rows = [
        ["X" if a == b else words[(min(a, b), max(a, b))] for b in range(count)]
        for a in range(count)
    ]
    return Topology.from_matrix(gpus, rows)


def main() -> None:
    rng = random.Random(2024)
    topologies = [random_topology(16, rng) for _ in range(10)]
    for size in (2, 4, 8):
        times = []
        for topology in topologies:
            start = time.perf_counter()
            grouping.partition(topology, size)
            times.append(time.perf_counter() - start)
        print(
            f"16 GPUs into groups of {size}: "
            f"median {sorted(times)[len(times) // 2] * 1000:.1f} ms, "
            f"worst {max(times) * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
