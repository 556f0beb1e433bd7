"""A benchmark node: temp dir, config, kubelet simulator process, the real plugin process."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc

from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc
from pkg.deviceplugin.nvml import fixtures, topofile
from pkg.deviceplugin.types import ResourceName, Topology, group_size_of

REPO = Path(__file__).resolve().parents[1]
RESOURCES: tuple[ResourceName, ...] = (
    ResourceName("kyb.ai/gpu-1x-seat"),
    ResourceName("kyb.ai/gpu-2x-seat"),
    ResourceName("kyb.ai/gpu-4x-seat"),
)
SEATS_PER_GROUP = 32
NODES = {"8-GPU": "dgx-a100", "16-GPU": "nvswitch-16"}


def config_text(seats: int = SEATS_PER_GROUP) -> str:
    """Three profiles, overprovisioned so that no allocation fences another profile."""
    profiles = "".join(
        f"  - resource: {resource}\n    seatsPerGroup: {seats}\n" for resource in RESOURCES
    )
    # No binding here is ever seen in PodResources except the admitted pods; a long
    # grace keeps the ledger from releasing the others in the middle of a measurement.
    return f"profiles:\n{profiles}allowOverprovision: true\nreleaseGracePeriod: 1h\n"


def topology_of(fixture: str) -> Topology:
    return topofile.load_topology_file(fixtures.resolve(fixture)).topology()


def seat_ids(fixture: str) -> dict[ResourceName, list[str]]:
    """Every profile's device IDs, as the plugin derives them from the same config."""
    specs = [layout_mod.ProfileSpec(r, group_size_of(r), SEATS_PER_GROUP) for r in RESOURCES]
    layout = layout_mod.build(specs, [], topology_of(fixture))
    return {r: [str(s.device_id) for s in layout.seats(r)] for r in RESOURCES}


def short_tmpdir(prefix: str) -> Path:
    # Unix socket paths must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(rest.split()[0])
    return found


class BenchError(Exception):
    """Something in the benchmark broke (not a missed target)."""


class LineProcess:
    """A child process that answers line commands on stdout."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self._log = open(log_path, "a")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            list(args),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.registered_at: float | None = None
        self.updates: list[tuple[str, float, int]] = []  # resource, time.time(), unhealthy
        self._registered = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if line.startswith("update "):
                _, resource, at, bad = line.split()
                self.updates.append((resource, float(at), int(bad)))
            elif line.startswith("registered "):
                self.registered_at = float(line.split()[1])
                self._registered.set()
            else:
                self._lines.put(line)
        self._lines.put(None)

    def expect(self, timeout: float = 30.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.process.args!r}: no answer within {timeout} s") from None
        if line is None:
            raise BenchError(f"{self.process.args!r} exited ({self.process.poll()})")
        return line

    def send(self, command: str, timeout: float = 30.0) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.expect(timeout)

    def wait_registered(self, timeout: float) -> float:
        if not self._registered.wait(timeout):
            raise BenchError(f"plugin did not register every profile within {timeout} s")
        assert self.registered_at is not None
        return self.registered_at

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def start_echo(socket_path: Path, log_path: Path, workers: int) -> tuple[LineProcess, grpc.Channel]:
    """The baseline server, with the plugin's gRPC pool size (``workers``)."""
    echo = LineProcess(
        [sys.executable, "-m", "bench.echo", str(socket_path), str(workers)], log_path
    )
    if echo.expect() != "ready":
        raise BenchError("echo server did not start")
    channel = grpc.insecure_channel(f"unix://{socket_path}")
    grpc.channel_ready_future(channel).result(timeout=10)
    return echo, channel


def stop_process(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(5)


class Node:
    """One mock GPU node: ``with Node("nvswitch-16") as node: ...``."""

    def __init__(
        self,
        fixture: str,
        prefix: str = "kyb-bench-",
        *,
        extra_config: str = "",
        updates: bool = False,
        env: dict[str, str] | None = None,
        server_workers: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.env = env or {}
        self.args = list(args)  # more serve flags (e.g. --handoff-window)
        self.server_workers = server_workers
        self.fixture = fixture
        self.root = short_tmpdir(prefix)
        self.kubelet_dir = self.root / "dp"
        self.pod_resources = self.root / "pr" / "kubelet.sock"
        self.state_dir = self.root / "state"
        self.config = self.root / "config.yaml"
        self.config.write_text(config_text() + extra_config)
        self.updates = updates
        self.plugin_log = self.root / "plugin.log"
        self.kubelet: LineProcess | None = None
        self.plugin: subprocess.Popen[str] | None = None
        self.channels: dict[ResourceName, grpc.Channel] = {}
        self.admitted: set[str] = set()  # device IDs of every pod admitted (any profile)

    def command(self) -> list[str]:
        # bench.plugin: the same serve command with another gRPC pool size
        entry = (
            ["cmd.kyb_device_plugin"]
            if self.server_workers is None
            else ["bench.plugin", str(self.server_workers)]
        )
        return [
            sys.executable,
            "-m",
            *entry,
            "serve",
            "--kubelet-dir",
            str(self.kubelet_dir),
            "--pod-resources-socket",
            str(self.pod_resources),
            "--state-dir",
            str(self.state_dir),
            "--nvml-mock",
            self.fixture,
            "--config",
            str(self.config),
            *self.args,
        ]

    def start(self, timeout: float = 60.0) -> float:
        """Start the kubelet, then the plugin; the seconds until every profile registered."""
        self.kubelet = LineProcess(
            [
                sys.executable,
                "-m",
                "bench.kubelet",
                *(["--updates"] if self.updates else []),
                str(self.kubelet_dir),
                str(self.pod_resources),
                *RESOURCES,
            ],
            self.root / "kubelet.log",
        )
        if self.kubelet.expect() != "ready":
            raise BenchError("kubelet simulator did not start")
        with open(self.plugin_log, "a") as log:
            started = time.monotonic()
            self.plugin = subprocess.Popen(
                self.command(),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        try:
            registered = self.kubelet.wait_registered(timeout)
        except BenchError:
            raise BenchError(f"{self.fixture}: {self.tail()}") from None
        return registered - started

    def stub(self, resource: ResourceName) -> api_pb2_grpc.DevicePluginStub:
        channel = self.channels.get(resource)
        if channel is None:
            path = self.kubelet_dir / f"kyb-gpu-{group_size_of(resource)}x-seat.sock"
            channel = self.channels[resource] = grpc.insecure_channel(f"unix://{path}")
            grpc.channel_ready_future(channel).result(timeout=10)
        return api_pb2_grpc.DevicePluginStub(channel)

    @property
    def state_file(self) -> Path:
        return StateStore(self.state_dir).path

    def socket(self, resource: ResourceName) -> Path:
        return self.kubelet_dir / f"kyb-gpu-{group_size_of(resource)}x-seat.sock"

    def admit(self, pod: str, resource: ResourceName, count: int) -> list[str]:
        assert self.kubelet is not None
        answer = self.kubelet.send(f"admit {pod} {resource} {count}")
        if not answer.startswith("ok "):
            raise BenchError(f"kubelet could not admit {pod}: {answer}")
        devices = answer[3:].split(",")
        self.admitted.update(devices)
        return devices

    def tail(self, lines: int = 5) -> str:
        text = self.plugin_log.read_text() if self.plugin_log.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        if self.plugin is not None:
            stop_process(self.plugin)
            self.plugin = None
        if self.kubelet is not None:
            self.kubelet.stop()
            self.kubelet = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Node:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
