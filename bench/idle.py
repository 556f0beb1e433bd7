"""Idle: what a registered plugin with nothing to do costs in CPU.

The plugin process (every profile registered with the kubelet simulator, defaults
otherwise: health probes every second, reconcile every 10 s, topology refresh every
30 s) is left alone for the window, and its CPU time (every thread's, from
``/proc/<pid>/task/*/schedstat``) is read before and after. The baseline is a bare idle grpc server
process serving as many Unix sockets as the plugin has profiles, measured over the same
window in the same run: what serving gRPC at all costs, which the plugin cannot beat.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.node import NODES, REPO, RESOURCES, Node, short_tmpdir
from bench.stats import Row, Target, row

SECTION = "idle: CPU of a registered plugin with nothing to do (% of one core)"
# Issue 18: at most 0.1 % of a core above what an idle grpc server costs.
TARGET = Target("<= bare + 0.1 %", "value", "<=", 0.1)

_BARE = """
import sys, time
from concurrent import futures
import grpc
servers = []
for path in sys.argv[1:]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_insecure_port("unix://" + path)
    server.start()
    servers.append(server)
print("ready", flush=True)
time.sleep(3600)
"""


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid``, in nanoseconds' precision (the first field
    of each ``/proc/<pid>/task/<tid>/schedstat``; ``stat``'s ticks are 10 ms, too coarse
    for a process that is meant to be idle)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as handle:
                total += int(handle.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def percent_of_core(pid: int, window_s: float, settle_s: float = 2.0) -> float:
    time.sleep(settle_s)
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)
    return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - started)


def bare_server(window_s: float) -> float:
    root = short_tmpdir("kyb-bench-idle-")
    paths = [str(root / f"s{i}.sock") for i in range(len(RESOURCES))]
    process = subprocess.Popen(
        [sys.executable, "-c", _BARE, *paths], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        return percent_of_core(process.pid, window_s)
    finally:
        process.kill()
        process.wait()


def run(window_s: float) -> list[Row]:
    bare = bare_server(window_s)
    rows = []
    for node_name, fixture in NODES.items():
        with Node(fixture, prefix="kyb-bench-idle-") as node:
            node.start()
            assert node.plugin is not None
            plugin = percent_of_core(node.plugin.pid, window_s)
        rows.append(
            row(
                SECTION,
                node_name,
                "plugin, registered and idle",
                plugin,
                "%",
                baseline=bare,
                baseline_name=f"bare grpc server, {len(RESOURCES)} sockets",
                samples=1,
                above_baseline=plugin - bare,
                window_s=window_s,
            )
        )
    # The target is on the excess over the baseline (a ratio to ~0.1 % means little).
    for r in rows:
        r.target = TARGET.text
        r.verdict = "pass" if TARGET.check(r.extra["above_baseline"], None) else "miss"
    return rows
