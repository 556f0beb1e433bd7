"""``python -m bench [--quick] [--json PATH] [--only SECTION ...] [--strict]``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from bench import coldstart, faults, grouping, health, idle, serving
from bench.node import NODES, REPO
from bench.stats import Row, print_table

DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"
SECTIONS = ("serving", "health", "faults", "coldstart", "grouping", "idle")


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small iteration counts (CI: checks the benchmark works, not its numbers)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write the results (default {DEFAULT_JSON.relative_to(REPO)})",
    )
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument(
        "--server-workers",
        type=int,
        metavar="N",
        help="serving: start the plugin with N gRPC workers per profile server "
        "(pkg.deviceplugin.server.manager.SERVER_WORKERS; default: the plugin's own)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    quick: bool = args.quick
    sizes = serving.QUICK if quick else serving.FULL
    chosen = args.only or list(SECTIONS)
    plan: list[tuple[str, str, Callable[[], list[Row]]]] = []
    if "serving" in chosen:
        for node_name, fixture in NODES.items():
            plan.append(
                (
                    "serving",
                    node_name,
                    partial(serving.run, node_name, fixture, sizes, args.server_workers),
                )
            )
    if "health" in chosen:
        for node_name, fixture in NODES.items():
            plan.append(
                ("health", node_name, partial(health.run, node_name, fixture, 10 if quick else 60))
            )
    if "faults" in chosen:
        plan.append(("faults", "flaky-4", partial(faults.run, 1 if quick else 3)))
    if "coldstart" in chosen:
        plan.append(("coldstart", "", lambda: coldstart.run(NODES, 2 if quick else 5)))
    if "grouping" in chosen:
        plan.append(("grouping", "", lambda: grouping.run(2 if quick else 10)))
    if "idle" in chosen:
        plan.append(("idle", "", lambda: idle.run(5.0 if quick else 60.0)))

    rows: list[Row] = []
    failures: list[dict[str, str]] = []
    info = machine()
    started = time.monotonic()
    for section, node_name, step in plan:
        label = f"{section} {node_name}".strip()
        print(f"... {label}", file=sys.stderr, flush=True)
        step_started = time.monotonic()
        try:
            rows += step()
        except Exception as exc:
            failures.append({"step": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"!!! {label} broke: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
        print(f"    {time.monotonic() - step_started:.1f} s", file=sys.stderr, flush=True)
    print(
        f"\nmachine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}, "
        f"grpcio {info['grpcio']}; mode {'quick' if quick else 'full'}; "
        f"{time.monotonic() - started:.0f} s\n"
    )
    print_table(rows, sys.stdout)
    misses = [r for r in rows if r.verdict == "miss"]
    broken = [r for r in rows if r.verdict == "error"]
    for failure in failures:
        print(f"BROKEN {failure['step']}: {failure['error']}")
    for r in broken:
        print(f"BROKEN {r.node} {r.figure}: {r.extra}")
    print(
        f"\n{len(rows)} figures, {len(misses)} missed targets, {len(failures) + len(broken)} broken"
    )
    doc = {
        "machine": info,
        "mode": "quick" if quick else "full",
        "server_workers": args.server_workers,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": [r.to_json() for r in rows],
        "broken": failures + [{"step": r.figure, "error": str(r.extra)} for r in broken],
    }
    path: Path = args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    if failures or broken:
        return 1
    if args.strict and misses:
        return 3
    return 0
