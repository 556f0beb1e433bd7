"""A node for the real-kubelet tests: the kubelet binary, the fake CRI and the plugin.

Everything lives in one temp dir per test under ``$KYB_E2E_WORK`` (made by
``conformance/kubelet/e2e.sh``), except the kubelet's fixed plugin directory
``/var/lib/kubelet/device-plugins``, which ``namespace.sh`` has bound over a temp dir in
this private mount namespace. The tests see the kubelet only as an operator does:
static pod manifests in, the kubelet's ``/pods`` endpoint, its PodResources socket, its
log, and what it sent the container runtime (the fake CRI's record).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from pkg.deviceplugin.api.podresources.v1 import api_pb2 as pr_pb2
from pkg.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc
from tests.e2e import support

REPO = support.REPO
# the kubelet and fakecri, as conformance/kubelet/e2e.sh builds them (it sets this)
BIN = Path(os.environ.get("KYB_E2E_BIN", "/nonexistent"))
PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
NODE_NAME = "kyb-e2e"
RESOURCES = ("kyb.ai/gpu-1x-seat", "kyb.ai/gpu-2x-seat")
KLOG_TIME = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")
DEVICE_COUNTS = re.compile(
    r'"Processed device updates for resource" resourceName="(?P<resource>[^"]+)" '
    r"totalCount=(?P<total>\d+) healthyCount=(?P<healthy>\d+)"
)
PRIVATE_MOUNTS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/proc/sys/kernel/panic",
    "/proc/sys/kernel/panic_on_oops",
    "/proc/sys/vm/overcommit_memory",
)


def why_not_here() -> str | None:
    """Why the kubelet must not start in this process, or None.

    The kubelet writes host-wide sysctls and fixed paths; it may start only inside the
    namespace ``e2e.sh`` made, with each of those paths covered by a mount of ours.
    """
    host = os.environ.get("KYB_E2E_HOST_MNTNS")
    if not host or not os.environ.get("KYB_E2E_WORK"):
        return "run through conformance/kubelet/e2e.sh (it makes the private mount namespace)"
    if os.readlink("/proc/self/ns/mnt") == host:
        return "not in a private mount namespace"
    mounted = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    missing = [p for p in PRIVATE_MOUNTS if p not in mounted]
    if missing:
        return f"not covered by a private mount: {', '.join(missing)}"
    if not (BIN / "kubelet").exists() or not (BIN / "fakecri").exists():
        return f"no kubelet or fakecri in {BIN} (conformance/kubelet/e2e.sh builds them)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """The predicate's first truthy value within ``timeout`` seconds, else its last."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def pod_manifest(
    name: str,
    resource: str = "kyb.ai/gpu-2x-seat",
    seats: int = 1,
    init_seats: int | None = None,
) -> dict[str, Any]:
    """A static pod: an app container asking for ``seats``, and an init container
    (command ``true``: the fake CRI lets it exit 0) asking for ``init_seats``."""

    def container(cname: str, command: list[str], count: int) -> dict[str, Any]:
        return {
            "name": cname,
            "image": "registry.k8s.io/pause:3.10",
            "command": command,
            "resources": {"limits": {resource: str(count)}},
        }

    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "containers": [container("app", ["sleep", "infinity"], seats)],
    }
    if init_seats is not None:
        spec["initContainers"] = [container("init", ["true"], init_seats)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


@dataclass
class Created:
    """One CreateContainer request the fake CRI recorded."""

    pod: str
    container: str
    envs: dict[str, str]
    devices: list[tuple[str, str, str]]  # (host path, container path, permissions)
    cdi: list[str]
    annotations: dict[str, str]

    @classmethod
    def parse(cls, line: str) -> Created:
        req = json.loads(line)
        config = req.get("config", {})
        return cls(
            pod=req.get("sandbox_config", {}).get("metadata", {}).get("name", ""),
            container=config.get("metadata", {}).get("name", ""),
            # CRI v1's KeyValue.value is bytes: base64 in protojson.
            envs={
                e["key"]: base64.b64decode(e.get("value", "")).decode()
                for e in config.get("envs", [])
            },
            devices=[
                (d.get("host_path", ""), d.get("container_path", ""), d.get("permissions", ""))
                for d in config.get("devices", [])
            ],
            cdi=[d.get("name", "") for d in config.get("CDI_devices", [])],
            annotations=dict(config.get("annotations", {})),
        )


@dataclass
class Node:
    """One node: the fake CRI, the kubelet and the plugin, each a process of its own."""

    root: Path
    topology: str = "dgx-a100"
    plugin_args: Sequence[str] = ()
    kubelet: subprocess.Popen[bytes] | None = None
    cri: subprocess.Popen[bytes] | None = None
    plugin: subprocess.Popen[bytes] | None = None
    port: int = field(default_factory=free_port)
    kubelet_starts: int = 0

    # -- paths -------------------------------------------------------------------------

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def record(self) -> Path:
        return self.root / "containers.jsonl"

    @property
    def pod_resources_socket(self) -> Path:
        return self.root / "kubelet" / "pod-resources" / "kubelet.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def log(self, which: str) -> str:
        path = self.root / f"{which}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """What the kubelet offers now and the tail of every log, for an assertion message
        (the kubelet's periodic housekeeping lines left out)."""
        counts = {r: len(v) for r, v in (self.allocatable_or_none() or {}).items()}
        tails = []
        for w in ("plugin", "kubelet", "fakecri"):
            lines = [ln for ln in self.log(w).splitlines() if "Clean up" not in ln]
            tails.append(f"--- {w}.log (tail)\n" + "\n".join(lines[-40:]))
        return f"allocatable now: {counts}\n" + "\n".join(tails)

    # -- processes ---------------------------------------------------------------------

    def kubelet_log_at(self, offset: int = 0) -> list[tuple[float, str]]:
        """The kubelet's log lines from byte ``offset`` on, with their klog time of day
        in seconds (``I1203 03:28:48.924053 ...``)."""
        path = self.root / "kubelet.log"
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            m = KLOG_TIME.match(line)
            if m:
                h, mi, sec = m.groups()
                out.append((int(h) * 3600 + int(mi) * 60 + float(sec), line))
        return out

    def device_counts(self, offset: int = 0) -> dict[str, tuple[int, int]]:
        """Each resource's (capacity, allocatable) as the kubelet last logged them
        (``Processed device updates``: total and healthy devices), from byte ``offset``."""
        out: dict[str, tuple[int, int]] = {}
        for _, line in self.kubelet_log_at(offset):
            m = DEVICE_COUNTS.search(line)
            if m:
                out[m["resource"]] = (int(m["total"]), int(m["healthy"]))
        return out

    def kubelet_log_size(self) -> int:
        path = self.root / "kubelet.log"
        return path.stat().st_size if path.exists() else 0

    def _spawn(self, which: str, args: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        # Working directory: this node's dir (the kubelet, cleaning up a container, globs
        # and deletes relative to it when a runtime reports no log path).
        kw.setdefault("cwd", self.root)
        with open(self.root / f"{which}.log", "ab") as out:
            return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kw)

    def start_cri(self) -> None:
        sock = self.root / "cri.sock"
        self.cri = self._spawn(
            "fakecri", [str(BIN / "fakecri"), "--listen", str(sock), "--record", str(self.record)]
        )
        assert wait_until(sock.exists, 10), self.logs()

    def kubelet_config(self) -> Path:
        cri = f"unix://{self.root / 'cri.sock'}"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "2s",
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "failCgroupV1": False,
            "containerRuntimeEndpoint": cri,
            "imageServiceEndpoint": cri,
            "resolvConf": "",
            "localStorageCapacityIsolation": False,
            "evictionHard": {},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "cpuManagerPolicy": "none",
            "memoryManagerPolicy": "None",
            "topologyManagerPolicy": "none",
            "makeIPTablesUtilChains": False,
            "podLogsDir": str(self.root / "pod-logs"),
        }
        path = self.root / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_kubelet(self) -> float:
        """Starts the kubelet; returns its start time (monotonic)."""
        self.manifests.mkdir(exist_ok=True)
        args = [
            str(BIN / "kubelet"),
            "--config",
            str(self.kubelet_config()),
            "--root-dir",
            str(self.root / "kubelet"),
            "--cert-dir",
            str(self.root / "pki"),
            "--hostname-override",
            NODE_NAME,
            "-v",
            "3",
        ]
        started = time.monotonic()
        self.kubelet = self._spawn("kubelet", args)
        self.kubelet_starts += 1
        assert wait_until(lambda: (PLUGIN_DIR / "kubelet.sock").exists(), 20), self.logs()
        return started

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        assert self.kubelet is not None
        self.kubelet.send_signal(sig)
        self.kubelet.wait(30)
        self.kubelet = None

    def plugin_command(self, subcommand: str = "serve") -> tuple[list[str], dict[str, str]]:
        nvml, env = support.nvml_args(self.topology, self.root)
        args = [
            sys.executable,
            "-m",
            "cmd.kyb_device_plugin",
            subcommand,
            "--kubelet-dir",
            str(PLUGIN_DIR),
            "--pod-resources-socket",
            str(self.pod_resources_socket),
            "--state-dir",
            str(self.state_dir),
            *nvml,
            *self.plugin_args,
        ]
        return args, env

    def _plugin_env(self, env: Mapping[str, str]) -> dict[str, str]:
        # The plugin sees only the flags a test passes, not the harness's KYB_ variables.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KYB_")}
        return {**clean, **env, "PYTHONUNBUFFERED": "1"}

    def start_plugin(self) -> None:
        args, env = self.plugin_command()
        self.plugin = self._spawn("plugin", args, cwd=REPO, env=self._plugin_env(env))

    def report(self, subcommand: str) -> dict[str, Any]:
        """``plan`` or ``status`` (the seat map in the plugin's state file), as JSON."""
        args, env = self.plugin_command(subcommand)
        out = subprocess.run(
            [*args, "--output", "json"],
            cwd=REPO,
            env=self._plugin_env(env),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def seats(self, resource: str) -> dict[str, dict[str, Any]]:
        """``status``: each seat of ``resource`` (state, generation, holder)."""
        groups = self.report("status")["resources"][resource]["groups"]
        return {seat: s for g in groups.values() for seat, s in g["seats"].items()}

    def stop_plugin(self, sig: int = signal.SIGTERM) -> int:
        assert self.plugin is not None
        self.plugin.send_signal(sig)
        code = self.plugin.wait(15)
        self.plugin = None
        return code

    def close(self) -> None:
        for p in (self.plugin, self.kubelet, self.cri):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)

    # -- what the kubelet reports ------------------------------------------------------

    def allocatable(self) -> dict[str, set[str]]:
        """PodResources GetAllocatableResources: each resource's healthy device IDs."""
        with grpc.insecure_channel(f"unix://{self.pod_resources_socket}") as ch:
            reply = pr_grpc.PodResourcesListerStub(ch).GetAllocatableResources(
                pr_pb2.AllocatableResourcesRequest(), timeout=5
            )
        out: dict[str, set[str]] = {}
        for d in reply.devices:
            out.setdefault(d.resource_name, set()).update(d.device_ids)
        return out

    def allocatable_or_none(self) -> dict[str, set[str]] | None:
        try:
            return self.allocatable()
        except grpc.RpcError:
            return None

    def pod_devices(self) -> dict[tuple[str, str], dict[str, set[str]]]:
        """PodResources List: (pod, container) -> resource -> device IDs."""
        with grpc.insecure_channel(f"unix://{self.pod_resources_socket}") as ch:
            reply = pr_grpc.PodResourcesListerStub(ch).List(
                pr_pb2.ListPodResourcesRequest(), timeout=5
            )
        out: dict[tuple[str, str], dict[str, set[str]]] = {}
        for pod in reply.pod_resources:
            for c in pod.containers:
                entry = out.setdefault((pod.name, c.name), {})
                for d in c.devices:
                    entry.setdefault(d.resource_name, set()).update(d.device_ids)
        return out

    def wait_allocatable(
        self, counts: Mapping[str, int], timeout: float = 20
    ) -> dict[str, set[str]] | None:
        """Waits until each resource has exactly ``counts[resource]`` allocatable IDs;
        returns what the kubelet offers then (``None`` on timeout)."""

        def match() -> tuple[dict[str, set[str]]] | None:
            got = self.allocatable_or_none()
            if got is None:
                return None
            if all(len(got.get(r, set())) == n for r, n in counts.items()):
                return (got,)  # truthy even when the kubelet offers nothing
            return None

        found = wait_until(match, timeout)
        return found[0] if found else None

    def pods(self) -> dict[str, dict[str, Any]]:
        """The kubelet's ``/pods`` (static pods with their status), by pod name."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{self.port}/pods"
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=5) as reply:
                data = json.load(reply)
        except OSError:
            return {}
        return {p["metadata"]["name"]: p for p in data.get("items") or []}

    def pod(self, name: str) -> dict[str, Any] | None:
        return self.pods().get(f"{name}-{NODE_NAME}")

    def phase(self, name: str) -> str | None:
        pod = self.pod(name)
        return None if pod is None else pod.get("status", {}).get("phase")

    def wait_phase(self, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
        pod = wait_until(
            lambda: (p := self.pod(name)) and p.get("status", {}).get("phase") == phase and p,
            timeout,
        )
        assert pod, f"pod {name}: phase {self.phase(name)}, want {phase}\n{self.logs()}"
        return pod  # type: ignore[no-any-return]

    def created(self, pod: str | None = None) -> list[Created]:
        """The CreateContainer requests recorded, in order (of ``pod`` only, if given)."""
        if not self.record.exists():
            return []
        lines = self.record.read_text().splitlines()
        out = [Created.parse(line) for line in lines if line.strip()]
        if pod is not None:
            out = [c for c in out if c.pod == f"{pod}-{NODE_NAME}"]
        return out

    def wait_created(
        self, pod: str, containers: Iterable[str], timeout: float = 20
    ) -> dict[str, Created]:
        want = set(containers)

        def done() -> dict[str, Created] | None:
            got = {c.container: c for c in self.created(pod)}
            return got if want <= got.keys() else None

        got = wait_until(done, timeout)
        assert got, f"pod {pod}: containers {sorted(want)} not created\n{self.logs()}"
        return got  # type: ignore[no-any-return]

    # -- pods --------------------------------------------------------------------------

    def add_pod(self, manifest: dict[str, Any]) -> str:
        """Writes a static pod manifest (a temp name, then renamed in: the kubelet never
        reads half a file). Returns the pod's name as given."""
        name = str(manifest["metadata"]["name"])
        tmp = self.manifests / f".{name}.yaml.tmp"
        tmp.write_text(yaml.safe_dump(manifest))
        tmp.rename(self.manifests / f"{name}.yaml")
        return name

    def delete_pod(self, name: str, timeout: float = 20) -> None:
        """Removes the manifest; waits until the kubelet no longer has the pod."""
        (self.manifests / f"{name}.yaml").unlink()
        gone = wait_until(
            lambda: (
                self.pod(name) is None
                and not any(p == f"{name}-{NODE_NAME}" for p, _ in self.pod_devices())
            ),
            timeout,
        )
        assert gone, f"pod {name} still known to the kubelet\n{self.logs()}"


def new_node(work: Path, name: str, **kw: Any) -> Node:
    root = work / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    # A fresh plugin directory: the previous test's kubelet left its checkpoint there.
    for entry in PLUGIN_DIR.iterdir() if PLUGIN_DIR.exists() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return Node(root, **kw)
