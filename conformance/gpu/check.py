"""One prepared check for a machine with a real NVIDIA GPU: ``python conformance/gpu/check.py``.

From the repository root, in the environment the tests use. It prints a short report:

1. the driver and its GPUs as NVML sees them (version, index, UUID, name, MIG mode);
2. ``pytest -m gpu`` (the real-NVML tests, skipped elsewhere);
3. ``plan --output json`` on the real backend: the GPUs, links and groups the plugin
   would serve;
4. ``serve`` against the kubelet simulator for ``--seconds`` (default 30) with health
   probes every second and the XID watch: one pod admitted per profile, its
   ``CUDA_VISIBLE_DEVICES``, ``KYB_GPU_INDICES`` and ``KYB_SEAT_GEN`` shown, every seat's
   health at the end, and every plugin log line of WARNING or worse.

Exit status: 0 when every step passed, 1 when one failed, 2 when there is no usable
NVIDIA driver (nothing was run). ``--nvml-library PATH`` runs it on another NVML library
(the test suite's mock, with ``KYB_NVML_MOCK_TOPOLOGY`` set) to check the check itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pkg.deviceplugin.kubeletsim.simulator import (  # noqa: E402
    AdmissionError,
    ContainerSpec,
    KubeletSimulator,
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--nvml-library", metavar="PATH")
    args = parser.parse_args(argv)
    nvml_args = ["--nvml-library", args.nvml_library] if args.nvml_library else []
    driver = _driver(args.nvml_library)
    if driver is None:
        return 2
    failed: list[str] = []
    if not _step("pytest -m gpu", _pytest_gpu):
        failed.append("pytest -m gpu")
    plan = _plan(nvml_args)
    if plan is None:
        failed.append("plan")
    elif not _serve(nvml_args, plan, args.seconds):
        failed.append("serve")
    print(f"\n== result: {'FAILED: ' + ', '.join(failed) if failed else 'all passed'}")
    return 1 if failed else 0


def _driver(library: str | None) -> object | None:
    import pynvml

    print("== driver")
    try:
        if library:
            from pkg.deviceplugin.nvml import mocklib

            mocklib.install(pynvml, Path(library))
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        print(f"no usable NVIDIA driver here: {exc}")
        return None
    try:
        print(f"driver {pynvml.nvmlSystemGetDriverVersion()}, NVML via pynvml")
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                mig = "MIG " + ("on" if pynvml.nvmlDeviceGetMigMode(handle)[0] else "off")
            except pynvml.NVMLError as exc:
                mig = f"MIG mode: {exc}"
            uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
            print(f"GPU {index}: {uuid} {name} ({mig})")
    finally:
        pynvml.nvmlShutdown()
    module: object = pynvml
    return module


def _step(title: str, run: object) -> bool:
    print(f"\n== {title}")
    assert callable(run)
    ok = bool(run())
    print(f"-> {'passed' if ok else 'FAILED'}")
    return ok


def _pytest_gpu() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "pkg"],
        cwd=REPO,
        check=False,
    )
    return result.returncode in (0, 5)  # 5: nothing collected, as on a machine without GPUs


def _plugin(*args: str) -> list[str]:
    return [sys.executable, "-m", "cmd.kyb_device_plugin", *args]


def _plan(nvml_args: list[str]) -> dict[str, object] | None:
    print("\n== plan --output json (real backend)")
    result = subprocess.run(
        _plugin("plan", "--output", "json", *nvml_args),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        print(result.stderr.strip())
        print("-> FAILED")
        return None
    plan: dict[str, object] = json.loads(result.stdout)
    print(json.dumps(plan, indent=1, sort_keys=True)[:4000])
    print("-> passed")
    return plan


def _serve(nvml_args: list[str], plan: dict[str, object], seconds: float) -> bool:
    print(f"\n== serve for {seconds:g} s against the kubelet simulator")
    root = Path(tempfile.mkdtemp(prefix="kyb-gpu-", dir="/tmp"))
    kubelet = KubeletSimulator(root / "dp", root / "pr" / "kubelet.sock")
    kubelet.start()
    listed = plan.get("resources", {})
    resources = sorted(listed) if isinstance(listed, dict) else []
    log_path = root / "plugin.log"
    command = _plugin(
        "serve",
        "--kubelet-dir",
        str(root / "dp"),
        "--pod-resources-socket",
        str(kubelet.pod_resources_socket),
        "--state-dir",
        str(root / "state"),
        "--health-probe-interval",
        "1s",
        *nvml_args,
    )
    ok = True
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    try:
        if not kubelet.wait_for(
            lambda: all(
                kubelet.endpoints.get(r) and kubelet.endpoints[r].updates for r in resources
            ),
            30.0,
        ):
            print(f"not every profile registered within 30 s: {resources}")
            ok = False
        for n, resource in enumerate(resources):
            try:
                pod = kubelet.admit(f"check-{n}", [ContainerSpec("main", {resource: 1})])
            except AdmissionError as exc:
                print(f"{resource}: admission refused: {exc}")
                ok = False
                continue
            envs = pod.allocations["main"][0].response.envs
            shown = ", ".join(
                f"{key}={envs.get(key)}"
                for key in (
                    "CUDA_VISIBLE_DEVICES",
                    "KYB_GPU_INDICES",
                    "KYB_GPU_GROUP",
                    "KYB_SEAT_GEN",
                )
            )
            print(f"{resource}: {shown}")
        time.sleep(max(seconds - 1.0, 0.0))
        for resource in resources:
            devices = kubelet.endpoints[resource].devices if resource in kubelet.endpoints else {}
            sick = sorted(d for d, h in devices.items() if h != "Healthy")
            print(f"{resource}: {len(devices)} seats, unhealthy: {sick or 'none'}")
    finally:
        process.terminate()
        code = process.wait(15)
        kubelet.stop()
    if code != 0:
        print(f"plugin exited {code}")
        ok = False
    lines = log_path.read_text().splitlines()
    loud = [line for line in lines if any(w in line for w in ("WARNING", "ERROR", "CRITICAL"))]
    print(f"plugin log: {len(lines)} lines, {len(loud)} at WARNING or worse")
    for line in loud[:40]:
        print(f"  {line}")
    shutil.rmtree(root, ignore_errors=True)
    print(f"-> {'passed' if ok else 'FAILED'}")
    return ok


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
