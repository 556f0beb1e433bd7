"""Starting the real plugin process against the kubelet simulator, over real Unix sockets."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.kubeletsim.simulator import KubeletSimulator
from pkg.deviceplugin.nvml import fixtures, mocklib, topofile
from pkg.deviceplugin.types import Topology, socket_name_of

REPO = Path(__file__).resolve().parents[2]
# `tox -e topo-<name>` runs the whole suite with one mock topology selected, and with
# KYB_TEST_NVML=mocklib the plugin process runs the real pynvml backend over the mock
# NVML library (built here with the system C compiler) instead of the Python mock.
TOPOLOGY = os.environ.get("KYB_TEST_TOPOLOGY", "dgx-a100")
NVML = os.environ.get("KYB_TEST_NVML", "python")


def fault_script_end(topology: str) -> float:
    """Seconds after start by which a topology's scripted faults have all happened."""
    faults = topofile.load_topology_file(fixtures.resolve(topology)).faults
    return max((f.at + (f.recover_after or 0.0) for f in faults), default=0.0)


@functools.cache
def mock_library() -> Path:
    return mocklib.build(Path(tempfile.mkdtemp(prefix="kyb-nvml-")))


def nvml_args(topology: str, root: Path) -> tuple[list[str], dict[str, str]]:
    """How the plugin process is pointed at the selected mock topology."""
    if NVML != "mocklib":
        return ["--nvml-mock", topology], {}
    data = mocklib.write_data(
        topofile.load_topology_file(fixtures.resolve(topology)), root / "nvml-mock.txt"
    )
    return ["--nvml-library", str(mock_library())], {"KYB_NVML_MOCK_TOPOLOGY": str(data)}


def write_topology(path: Path, faults: Sequence[topofile.Fault] = (), base: str = TOPOLOGY) -> Path:
    """A mock topology file: ``base``'s GPUs and links with ``faults`` as its whole script.

    Its path goes where a topology name does (``Node.topology``, ``--nvml-mock``), in
    both NVML modes.
    """
    tf = topofile.load_topology_file(fixtures.resolve(base))
    scripted = topofile.TopologyFile(gpus=tf.gpus, links=tf.links, faults=tuple(faults))
    path.write_text(yaml.safe_dump(scripted.to_data(), sort_keys=False))
    return path


def topology_of(name: str = TOPOLOGY) -> Topology:
    return topofile.load_topology_file(fixtures.resolve(name)).topology()


def short_tmpdir() -> Path:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="kyb-e2e-", dir="/tmp"))


@dataclass
class Node:
    """A node for one test: a temp dir, the kubelet simulator, and the plugin process."""

    root: Path
    kubelet: KubeletSimulator
    topology: str = TOPOLOGY
    config_text: str | None = None
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[str] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "plugin.log"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "dp"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def command(self, subcommand: str = "serve", *more: str) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "cmd.kyb_device_plugin",
            subcommand,
            "--kubelet-dir",
            str(self.kubelet_dir),
            "--pod-resources-socket",
            str(self.kubelet.pod_resources_socket),
            "--state-dir",
            str(self.state_dir),
            *nvml_args(self.topology, self.root)[0],
            "--reconcile-interval",
            "500ms",
        ]
        if self.config_text is not None:
            config = self.root / "config.yaml"
            config.write_text(self.config_text)
            args += ["--config", str(config)]
        return [*args, *self.extra_args, *more]

    def start_plugin(self) -> subprocess.Popen[str]:
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={
                    **os.environ,
                    **nvml_args(self.topology, self.root)[1],
                    "PYTHONUNBUFFERED": "1",
                },
            )
        return self.process

    def stop_plugin(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_registered(
        self, resources: Sequence[str], timeout: float = 10.0, after: dict[str, int] | None = None
    ) -> bool:
        """Every resource registered (again, beyond the counts in ``after``) with a device list."""

        def done() -> bool:
            for r in resources:
                endpoint = self.kubelet.endpoints.get(r)
                if endpoint is None or not endpoint.connected or endpoint.updates == 0:
                    return False
                if after is not None and endpoint.registrations <= after.get(r, 0):
                    return False
            return True

        return self.kubelet.wait_for(done, timeout)


def node(
    topology: str = TOPOLOGY, config_text: str | None = None, extra_args: Sequence[str] = ()
) -> Generator[Node, None, None]:
    root = short_tmpdir()
    kubelet = KubeletSimulator(root / "dp", root / "pr" / "kubelet.sock")
    kubelet.start()
    n = Node(root, kubelet, topology, config_text, extra_args)
    try:
        yield n
    finally:
        if n.process is not None and n.process.poll() is None:
            n.process.kill()
            n.process.wait(5)
        kubelet.stop()
        shutil.rmtree(root, ignore_errors=True)


def plugin_stub(node: Node, resource: str) -> api_pb2_grpc.DevicePluginStub:
    path = node.kubelet_dir / socket_name_of(resource)
    return api_pb2_grpc.DevicePluginStub(grpc.insecure_channel(f"unix://{path}"))


def allocate(
    plugin: api_pb2_grpc.DevicePluginStub, ids: Sequence[str]
) -> api_pb2.ContainerAllocateResponse:
    reply = plugin.Allocate(
        api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))]
        ),
        timeout=5,
    )
    return reply.container_responses[0]


def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
