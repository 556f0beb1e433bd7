"""``demo``: the plugin on a mock GPU node against the kubelet simulator, in a temp dir.

No GPU, no kubelet, no root. It registers every profile, admits a few pods the way the
kubelet would (one with an init container whose seat passes to the app container), shows
what a container receives, and prints the seat map.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TextIO

from pkg.deviceplugin import report
from pkg.deviceplugin.config.model import Config
from pkg.deviceplugin.kubeletsim.simulator import AdmissionError, ContainerSpec, KubeletSimulator
from pkg.deviceplugin.nvml import mock
from pkg.deviceplugin.runtime import Runtime

DEFAULT_TOPOLOGY = "dgx-a100"
REGISTER_TIMEOUT_S = 10.0


def run(config: Config, topology: str, out: TextIO) -> int:
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kyb-demo-") as tmp:
        root = Path(tmp)
        config = config.model_copy(
            update={
                "kubelet_dir": root / "device-plugins",
                "pod_resources_socket": root / "pod-resources" / "kubelet.sock",
                "state_dir": root / "state",
            }
        )
        kubelet = KubeletSimulator(config.kubelet_dir, config.pod_resources_socket)
        kubelet.start()
        runtime = Runtime(config, mock.MockBackend.from_name_or_path(topology))
        try:
            runtime.start()
            return _show(config, runtime, kubelet, topology, out)
        finally:
            runtime.stop()
            kubelet.stop()


def _show(
    config: Config, runtime: Runtime, kubelet: KubeletSimulator, topology: str, out: TextIO
) -> int:
    resources = list(runtime.board.layout.profiles)
    out.write(f"kyb-device-plugin demo on mock node '{topology}'\n\n")
    out.write(report.topology_matrix(runtime.topology) + "\n")
    registered = kubelet.wait_for(
        lambda: all(r in kubelet.endpoints and kubelet.endpoints[r].updates > 0 for r in resources),
        REGISTER_TIMEOUT_S,
    )
    if not registered:
        out.write("error: not every profile registered with the kubelet simulator\n")
        return 1
    for resource in resources:
        out.write(
            f"registered {resource}: {len(kubelet.healthy(resource))} healthy seat(s) "
            f"on socket {kubelet.endpoints[resource].socket}\n"
        )
    out.write("\n")
    first, *rest = resources
    pods = [("trainer", first, 1, True), ("notebook", first, 1, False)]
    if rest:
        pods.append(("inference", rest[0], 1, False))
    for name, resource, count, with_init in pods:
        init = [ContainerSpec("warmup", {resource: count})] if with_init else []
        try:
            pod = kubelet.admit(name, [ContainerSpec("main", {resource: count})], init)
        except AdmissionError as exc:
            out.write(f"pod {name}: not admitted: {exc}\n")
            continue
        for container, allocations in pod.allocations.items():
            for allocation in allocations:
                envs = allocation.response.envs
                devices = ",".join(d.host_path for d in allocation.response.devices)
                out.write(
                    f"pod {name}/{container}: {resource} seat {envs['KYB_GPU_SEAT']} "
                    f"(group {envs['KYB_GPU_GROUP']}, generation {envs['KYB_SEAT_GEN']}) "
                    f"GPUs {envs['KYB_GPU_INDICES']} CUDA_VISIBLE_DEVICES="
                    f"{envs['CUDA_VISIBLE_DEVICES']} devices={devices}\n"
                )
    out.write("\nseat map:\n")
    report.print_seat_map(runtime.board.status(), out)
    return 0
