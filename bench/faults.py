"""Scripted faults through the real process: detection -> ListAndWatch update.

The ``flaky-4`` mock node (SPEC section 9 ``faults:``): GPU 2 falls off the bus 1.0 s
after the backend starts, GPU 1 reports critical XID 79 at 1.5 s. The plugin runs with
JSON logs; the health monitor logs each GPU it marks unhealthy at the moment it decides
(its ``time``, millisecond resolution, wall clock). The kubelet simulator process stamps
each ListAndWatch message on arrival (wall clock, same machine). The figure is, per
detection, the time until every profile whose seats it changes has sent the update.
How soon a fault is *detected* is the probe interval's business (``healthProbeInterval``,
1 s here, the default; XIDs arrive as events) and is not part of this figure.
"""

from __future__ import annotations

import json
import time

from bench.node import RESOURCES, BenchError, Node
from bench.stats import Row, Target, row

TARGET = Target("< 100 ms", "value", "<", 100.0)
JSON_LOGS = "logFormat: json\n"
SECTION = "scripted fault (flaky-4, real process): detection -> ListAndWatch update"


def _log_time(text: str) -> float:
    # logging's default formatTime: "2024-05-01 12:00:00,123", local time, truncated ms
    base, _, ms = text.partition(",")
    return time.mktime(time.strptime(base, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1e3


def run(runs: int) -> list[Row]:
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        with Node(
            "flaky-4", "kyb-bench-fault-", extra_config="logFormat: json\n", updates=True
        ) as node:
            node.start()
            assert node.kubelet is not None
            deadline = time.monotonic() + 6.0
            detections: list[tuple[str, float]] = []
            while time.monotonic() < deadline and len(detections) < 2:
                time.sleep(0.2)
                detections = []
                for line in node.plugin_log.read_text().splitlines():
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        continue
                    if doc.get("logger") == "pkg.deviceplugin.health" and " unhealthy: " in doc.get(
                        "msg", ""
                    ):
                        gpu = doc["msg"].split(" (")[0]
                        detections.append((f"{gpu} marked unhealthy", _log_time(doc["time"])))
            time.sleep(0.3)
            if len(detections) < 2:
                raise BenchError(f"expected 2 scripted faults detected, saw {detections}")
            updates = list(node.kubelet.updates)
            for what, detected in detections:
                arrivals = []
                for resource in RESOURCES:
                    mine = [(at, bad) for r, at, bad in updates if r == resource]
                    before = [bad for at, bad in mine if at < detected]
                    after = [
                        at
                        for at, bad in mine
                        if at >= detected - 0.001 and before and bad != before[-1]
                    ]
                    if after:
                        arrivals.append(after[0])
                if not arrivals:
                    raise BenchError(f"no ListAndWatch update after {what}")
                samples.setdefault(what, []).append((max(arrivals) - detected) * 1e3)
    return [
        row(
            SECTION,
            "4-GPU",
            f"{what} -> every profile it affects (max)",
            max(values),
            "ms",
            target=TARGET,
            samples=len(values),
            values=values,
        )
        for what, values in samples.items()
    ]
