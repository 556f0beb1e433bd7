"""Where the time and memory go: ``python -m bench.profile [new|preferred|memory|journal ...]``.

In-process cProfile of the plugin's hot paths (no gRPC: that part is the echo's), on the
16-GPU node with the benchmark's three profiles of 32 seats:

- ``new``: ``SeatBoard.allocate`` of fresh seats with a real (fsync'ing) state store,
  plus a split of one new binding into its steps;
- ``preferred``: ``SeatBoard.preferred`` with every 1x seat available, size 2;
- ``memory``: the serving process's RSS after each import of the serve path;
- ``journal``: what a write-ahead journal would cost a new binding, measured without
  one in the product: ``StateStore.write`` of the state file as big as the bench's
  16-GPU node has it at its new bindings, and of a file as small as one journal record
  (~200 bytes), against appending one such record to an open file and ``fdatasync``.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench import rpc
from bench.node import REPO, RESOURCES, SEATS_PER_GROUP, seat_ids, short_tmpdir, topology_of
from bench.stats import percentile
from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator import views
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore, encode_object
from pkg.deviceplugin.types import DeviceId, ResourceName, group_size_of

FIXTURE = "nvswitch-16"


def _board(state: StateStore | None) -> SeatBoard:
    specs = [layout_mod.ProfileSpec(r, group_size_of(r), SEATS_PER_GROUP) for r in RESOURCES]
    layout = layout_mod.build(specs, [], topology_of(FIXTURE))
    # the bench's windows: nothing released, a repeat stays the hand-off (the default
    # window, 2 s, would turn the repeat measured below into new bindings on a slow run)
    return SeatBoard(
        layout,
        Policy(allow_overprovision=True),
        state,
        release_grace_s=3600.0,
        handoff_s=3600.0,
    )


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


class _NoWrite(StateStore):
    """A state store whose durable writes do nothing (everything before them runs)."""

    def write(self, payload: str) -> None:
        pass

    def append(self, seats: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        pass


def new_binding() -> None:
    root = short_tmpdir("kyb-bench-prof-")
    try:
        store = StateStore(root / "state")
        board = _board(store)
        one_x = ResourceName("kyb.ai/gpu-1x-seat")
        seats = [DeviceId(s) for s in seat_ids(FIXTURE)[one_x]]
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

            def one_group() -> None:
                board._encoder.forget((one_x, group.name))
                board._state_fields()

            def from_scratch() -> None:
                board._encoder.forget_all()
                board._state_fields()

            steps = {
                "views.build (every seat of every profile)": _ms(
                    lambda: views.build(board._facts(), version), 20
                ),
                "_bindings_changed_locked (one group, what a new binding pays)": _ms(
                    lambda: board._bindings_changed_locked({(one_x, group)}), 200
                ),
                "_state_fields, one group encoded again": _ms(one_group, 200),
                "_state_fields, every group encoded (a full save)": _ms(from_scratch, 20),
                "json.dumps(sort_keys, indent=1) of the whole document": _ms(
                    lambda: json.dumps(json.loads(payload), sort_keys=True, indent=1), 20
                ),
                "StateStore.write (write + 2 fsync + rename)": _ms(
                    lambda: store.write(payload), 20
                ),
                "allocate, repeat of a bound seat (the hand-off)": _ms(
                    lambda: board.allocate(one_x, [[seats[0]]], None), 200
                ),
            }
        finally:
            board._lock.release()
        # A new binding whole, next to the same write alone and to a new binding on a
        # board whose write does nothing (the board's CPU), in alternating blocks, p50.
        cpu_board = _board(_NoWrite(root / "cpu"))
        cpu_fresh = iter(seats)
        for _ in range(100):  # as many bound as on the board above
            cpu_board.allocate(one_x, [[next(cpu_fresh)]], None)

        def new(_: int) -> None:
            board.allocate(one_x, [[next(fresh)]], None)

        def cpu(_: int) -> None:
            cpu_board.allocate(one_x, [[next(cpu_fresh)]], None)

        # on stores of their own: the board's write behind uses its own
        alone = StateStore(root / "alone")
        line = [(one_x, seats[0], board._ledger.to_entry((one_x, seats[0])))]
        split = rpc.interleaved(
            {
                "new": new,
                "write": lambda _: alone.write(payload),
                "append": lambda _: alone.append(line),
                "cpu": cpu,
            },
            rounds=15,
            per_round=10,
            warmup=5,
        )
        for name, key in (
            ("allocate, new binding, all of it (p50)", "new"),
            ("StateStore.append of its journal line alone, same blocks (p50)", "append"),
            ("StateStore.write alone (the write behind), same blocks (p50)", "write"),
            ("allocate, new binding, journal and write no-ops: the board's CPU (p50)", "cpu"),
        ):
            steps[name] = percentile(split[key], 50)
        print(f"==== one new binding, step by step ({len(payload) / 1e3:.0f} kB state file)")
        for name, ms in steps.items():
            print(f"  {ms:8.3f} ms  {name}")
        print()
    finally:
        shutil.rmtree(root, ignore_errors=True)


JOURNAL_RECORD_BYTES = 200
JOURNAL_BOUND_SEATS = 50
"""1x seats bound on the 16-GPU board before the journal measurement: the state file is
then about as big as the bench's 16-GPU one when its new bindings start."""


def journal(rounds: int = 40, per_round: int = 10) -> None:
    root = short_tmpdir("kyb-bench-journal-")
    try:
        board = _board(None)
        one_x = ResourceName("kyb.ai/gpu-1x-seat")
        for device_id in [DeviceId(s) for s in seat_ids(FIXTURE)[one_x]][:JOURNAL_BOUND_SEATS]:
            board.allocate(one_x, [[device_id]], None)
        with board._lock:
            state = encode_object({**board._state_fields(), "version": "1"})
        # One record as a journal would append it: the seat, its ledger entry, padded.
        key = next(iter(board._ledger.keys()))
        entry = json.dumps({"seat": list(key), **board._ledger.to_entry(key)})
        record = (entry + " " * JOURNAL_RECORD_BYTES)[: JOURNAL_RECORD_BYTES - 1] + "\n"
        big = StateStore(root / "big")
        small = StateStore(root / "small")
        appended = os.open(root / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # A journal whose space is written (zeros) and synced once ahead: an overwrite
        # in place changes no file size or extent, so fdatasync flushes the data alone.
        slots = (rounds + 2) * per_round
        ahead = os.open(root / "journal-ahead", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(ahead, b"\0" * (slots * JOURNAL_RECORD_BYTES))
        os.fsync(ahead)
        data = record.encode()

        def append(_: int) -> None:
            os.write(appended, data)
            os.fdatasync(appended)

        def overwrite(i: int) -> None:
            os.pwrite(ahead, data, (i % slots) * JOURNAL_RECORD_BYTES)
            os.fdatasync(ahead)

        try:
            samples = rpc.interleaved(
                {
                    f"StateStore.write, {len(state) / 1e3:.0f} kB (the whole state file)": (
                        lambda _: big.write(state)
                    ),
                    f"StateStore.write, {len(record)} B file": lambda _: small.write(record),
                    f"append {len(data)} B to an open file + fdatasync": append,
                    f"overwrite {len(data)} B in a pre-written file + fdatasync": overwrite,
                },
                rounds=rounds,
                per_round=per_round,
                warmup=5,
            )
        finally:
            os.close(appended)
            os.close(ahead)
        print(
            f"==== durable write of one new binding, {rounds} x {per_round} each, in "
            f"alternating blocks, on {root.parent} (ms)"
        )
        for name, values in samples.items():
            print(f"  p50 {percentile(values, 50):6.3f}  p99 {percentile(values, 99):6.3f}  {name}")
        whole, *_, first_append, in_place = (percentile(v, 50) for v in samples.values())
        print(
            f"  a journal record instead of the whole file would save {whole - first_append:.3f}"
            f" ms (append) or {whole - in_place:.3f} ms (pre-written) per new binding, p50"
        )
        print()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def preferred() -> None:
    board = _board(None)
    one_x = ResourceName("kyb.ai/gpu-1x-seat")
    available = [DeviceId(s) for s in seat_ids(FIXTURE)[one_x]]

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
    "pkg.deviceplugin.runtime",
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
            "import sys, pkg.deviceplugin.cli, pkg.deviceplugin.runtime;"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    print(f"\ntop-level modules the serve path loads:\n{loaded.stdout}")


def main(argv: list[str]) -> int:
    chosen = argv or ["new", "preferred", "memory", "journal"]
    steps = {"new": new_binding, "preferred": preferred, "memory": memory, "journal": journal}
    for name in chosen:
        steps[name]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
