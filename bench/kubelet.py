"""The kubelet simulator in its own process, so its work does not share the bench's GIL.

Run as ``python -m bench.kubelet [--updates] KUBELET_DIR POD_RESOURCES_SOCKET RESOURCE...``. It
starts :class:`KubeletSimulator`, prints ``ready``, and prints ``registered <t>`` once
every named resource has registered and sent its device list, ``t`` being
``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process on the machine)
at that moment. On stdin it takes commands, one per line, each answered by one line:

- ``admit POD RESOURCE COUNT``: admit a pod with one container asking COUNT seats
  (GetPreferredAllocation, then Allocate, as the kubelet does); ``ok ID,ID`` or
  ``error TEXT``;
- ``quit``: stop.

With ``--updates`` it also prints ``update RESOURCE T UNHEALTHY`` for each ListAndWatch
message it sees (``T`` is ``time.time()`` at its arrival, UNHEALTHY the count of seats
the message reports unhealthy).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from pkg.deviceplugin.kubeletsim.simulator import AdmissionError, ContainerSpec, KubeletSimulator

_out = threading.Lock()


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    updates = "--updates" in argv
    kubelet_dir, pod_resources, *resources = [a for a in argv if a != "--updates"]
    kubelet = KubeletSimulator(Path(kubelet_dir), Path(pod_resources))
    kubelet.start()

    def registered() -> bool:
        for resource in resources:
            endpoint = kubelet.endpoints.get(resource)
            if endpoint is None or not endpoint.connected or endpoint.updates == 0:
                return False
        return True

    def watch() -> None:
        if kubelet.wait_for(registered, 120.0):
            say(f"registered {time.monotonic():.6f}")
        else:
            say("error not registered within 120 s")

    def report() -> None:
        seen: dict[str, int] = {}
        fresh: list[tuple[str, int]] = []

        def changed() -> bool:
            # runs under the simulator's lock, at each ListAndWatch message
            for resource, endpoint in kubelet.endpoints.items():
                if endpoint.updates != seen.get(resource):
                    seen[resource] = endpoint.updates
                    bad = sum(h != "Healthy" for h in endpoint.devices.values())
                    fresh.append((resource, bad))
            return bool(fresh)

        while True:
            kubelet.wait_for(changed, 3600.0)
            now = time.time()
            for resource, bad in fresh:
                say(f"update {resource} {now:.6f} {bad}")
            fresh.clear()

    threading.Thread(target=watch, daemon=True).start()
    if updates:
        threading.Thread(target=report, daemon=True).start()
    say("ready")
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            if words[0] == "admit" and len(words) == 4:
                name, resource, count = words[1], words[2], int(words[3])
                try:
                    pod = kubelet.admit(name, [ContainerSpec("main", {resource: count})])
                except AdmissionError as exc:
                    say(f"error {' '.join(str(exc).split())}")
                    continue
                ids = [d for a in pod.allocations["main"] for d in a.device_ids]
                say(f"ok {','.join(ids)}")
            else:
                say(f"error unknown command {line.strip()!r}")
    finally:
        kubelet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
