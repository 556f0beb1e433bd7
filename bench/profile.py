"""Where the time and memory go: ``python -m bench.profile [new|preferred|memory ...]``.

In-process cProfile of the plugin's hot paths (no gRPC: that part is the echo's), on the
16-GPU node with the benchmark's three profiles of 32 seats:

- ``new``: ``SeatBoard.allocate`` of fresh seats with a real (fsync'ing) state store,
  plus a split of one new binding into its steps;
- ``preferred``: ``SeatBoard.preferred`` with every 1x seat available, size 2;
- ``memory``: the serving process's RSS after each import of the serve path.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from bench.node import REPO, RESOURCES, SEATS_PER_GROUP, seat_ids, short_tmpdir, topology_of
from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.board import Policy, SeatBoard
from pkg.deviceplugin.allocator.store import StateStore, encode_object
from pkg.deviceplugin.types import ResourceName, group_size_of

FIXTURE = "nvswitch-16"


def _board(state: StateStore | None) -> SeatBoard:
    specs = [layout_mod.ProfileSpec(r, group_size_of(r), SEATS_PER_GROUP) for r in RESOURCES]
    layout = layout_mod.build(specs, [], topology_of(FIXTURE))
    return SeatBoard(layout, Policy(allow_overprovision=True), state, release_grace_s=3600.0)


def _profile(title: str, work: Callable[[], None], lines: int = 18) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    work()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    print(f"==== {title}\n{out.getvalue()}")


def _ms(work: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) * 1e3 / repeat


def new_binding() -> None:
    root = short_tmpdir("kyb-bench-prof-")
    try:
        store = StateStore(root / "state")
        board = _board(store)
        one_x = ResourceName("kyb.ai/gpu-1x-seat")
        seats = seat_ids(FIXTURE)[one_x]
        fresh = iter(seats)

        def bind(count: int) -> None:
            for _ in range(count):
                board.allocate(one_x, [[next(fresh)]], {})

        _profile("SeatBoard.allocate, 100 new bindings (1x, observed={})", lambda: bind(100))
        board._lock.acquire()  # the steps, one by one, as allocate runs them
        try:
            version = board.version
            fields = board._state_fields()
            payload = encode_object({**fields, "version": "1"})
            group = next(iter(board.layout.profiles[one_x].groups))

            def from_scratch() -> None:
                board._encoded.clear()
                board._encoded_retired = None
                board._state_fields()

            steps = {
                "_build_snapshot (every seat of every profile)": _ms(
                    lambda: board._build_snapshot(version), 20
                ),
                "_bindings_changed_locked (one group, what a new binding pays)": _ms(
                    lambda: board._bindings_changed_locked({(one_x, group)}), 200
                ),
                "_state_fields, one group encoded again": _ms(
                    lambda: (board._encoded.pop((one_x, group.name), None), board._state_fields()),
                    200,
                ),
                "_state_fields, every group encoded (a full save)": _ms(from_scratch, 20),
                "json.dumps(sort_keys, indent=1) of the whole document": _ms(
                    lambda: json.dumps(json.loads(payload), sort_keys=True, indent=1), 20
                ),
                "StateStore.write (write + 2 fsync + rename)": _ms(
                    lambda: store.write(payload), 20
                ),
                "allocate, repeat of a bound seat": _ms(
                    lambda: board.allocate(one_x, [[seats[0]]], None), 200
                ),
            }
        finally:
            board._lock.release()
        print(f"==== one new binding, step by step ({len(payload) / 1e3:.0f} kB state file)")
        for name, ms in steps.items():
            print(f"  {ms:8.3f} ms  {name}")
        print()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def preferred() -> None:
    board = _board(None)
    one_x = ResourceName("kyb.ai/gpu-1x-seat")
    available = list(seat_ids(FIXTURE)[one_x])

    def pick(size: int, times: int) -> None:
        for _ in range(times):
            board.preferred(one_x, available, [], size)

    for size in (1, 2):
        ms = _ms(lambda: pick(size, 1), 50)  # noqa: B023 (used at once)
        print(
            f"==== SeatBoard.preferred, {len(available)} seats available, size {size}: {ms:.3f} ms"
        )
    _profile("SeatBoard.preferred x50, size 2", lambda: pick(2, 50))


IMPORTS = [
    "grpc",
    "google.protobuf",
    "pkg.deviceplugin.api.deviceplugin.v1beta1.api_pb2_grpc",
    "pydantic",
    "yaml",
    "pkg.deviceplugin.config.model",
    "pkg.deviceplugin.config.loader",
    "pkg.deviceplugin.nvml.mock",
    "pynvml",
    "prometheus_client",
    "jinja2",
    "pkg.deviceplugin.cli",
    "pkg.deviceplugin.server.runtime",
]

_MEMORY_SCRIPT = """
import importlib, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1])
base = rss()
print(f"{base / 1024:7.1f} MiB  python itself")
for name in sys.argv[1:]:
    before = rss()
    try:
        importlib.import_module(name)
    except Exception as exc:
        print(f"          {name}: {exc}")
        continue
    after = rss()
    print(f"{after / 1024:7.1f} MiB  +{(after - before) / 1024:5.1f}  import {name}")
"""


def memory() -> None:
    print("==== resident memory after each import (cumulative, in import order)")
    subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *IMPORTS], cwd=REPO, check=True)
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pkg.deviceplugin.cli, pkg.deviceplugin.server.runtime;"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    print(f"\ntop-level modules the serve path loads:\n{loaded.stdout}")


def main(argv: list[str]) -> int:
    chosen = argv or ["new", "preferred", "memory"]
    for name in chosen:
        {"new": new_binding, "preferred": preferred, "memory": memory}[name]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
