"""The profile servers of one process: which run, and the loop that moves them on.

The manager serves exactly the board's profiles, one :class:`ProfileServer` each
(``profile.py``: its socket, its registration, the kubelet's stream on it): ``sync``
starts the new ones and stops the removed ones, and the watch loop ticks them all.

The kubelet may be absent at start, may restart at any time (it wipes the socket
directory and creates a new ``kubelet.sock``), and may be slow. The watch loop lets
each profile check that its socket is still its own and that ``kubelet.sock`` is the
one it registered with; otherwise it re-serves and re-registers. It runs every
``WATCH_INTERVAL_S`` and at once when an entry of the kubelet's directory appears,
goes or is renamed (inotify): a restarted kubelet re-admits its running pods within
about 100 ms of serving ``kubelet.sock``, and refuses (and so kills) a pod whose init
container holds one of our seats unless the profile is registered by then (README,
"Kubelet restarts"; kubernetes issues 124345 and 138446).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.metrics import NullMetrics, Recorder
from pkg.deviceplugin.server import registration
from pkg.deviceplugin.server.dirwatch import DirWatch
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.server.profile import ProfileServer, inode
from pkg.deviceplugin.types import ResourceName

log = logging.getLogger(__name__)

# Where the kubelet directory cannot be watched, the loop polls it this often; where it
# can, it sleeps until the directory changes, a stream opens or ends, a Register returns
# or one of its own timers is due, and at least every IDLE_WAKE_S.
WATCH_INTERVAL_S = 0.1
IDLE_WAKE_S = 60.0
# Threads per profile's gRPC server. Each ListAndWatch stream holds one for its life:
# the kubelet's (two for a moment across a kubelet restart), so at least two are left
# for Allocate, GetPreferredAllocation and the liveness probe, which the kubelet sends
# one at a time per resource. More threads only take turns at the GIL and keep their
# malloc arenas (bench/README.md measures 4 against 2, 8 and 16).
SERVER_WORKERS = 4


class PluginManager:
    def __init__(
        self,
        board: SeatBoard,
        kubelet_dir: Path,
        pod_resources: PodResourcesClient | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        recorder: Recorder | None = None,
        register_timeout_s: float = registration.TIMEOUT_S,
        dev_root: Path = Path("/"),
    ) -> None:
        """``dev_root``: where the node's ``/dev`` is, for the Allocate answers."""
        self._board = board
        self._dev_root = dev_root
        self._kubelet_dir = kubelet_dir
        self._kubelet_socket = kubelet_dir / registration.KUBELET_SOCKET
        self._pod_resources = pod_resources
        self._clock = clock
        self._recorder = recorder or NullMetrics()
        self._register_timeout_s = register_timeout_s
        self._served: dict[ResourceName, ProfileServer] = {}
        self._lock = threading.Lock()
        self._kubelet_inode: int | None = None
        self._watch: DirWatch | None = None

    @property
    def resources(self) -> list[ResourceName]:
        with self._lock:
            return sorted(self._served)

    def registered(self) -> dict[ResourceName, bool]:
        with self._lock:
            return {r: s.registered for r, s in self._served.items()}

    def sync(self) -> None:
        """Serve exactly the board's profiles: start new ones, stop removed ones."""
        wanted = set(self._board.layout.profiles)
        with self._lock:
            for resource in sorted(set(self._served) - wanted):
                log.info("profile removed; stopping its server", extra={"resource": resource})
                self._served.pop(resource).stop()
            for resource in sorted(wanted - set(self._served)):
                self._served[resource] = ProfileServer(
                    resource,
                    self._board,
                    self._pod_resources,
                    self._kubelet_dir,
                    workers=SERVER_WORKERS,
                    recorder=self._recorder,
                    clock=self._clock,
                    register_timeout_s=self._register_timeout_s,
                    on_change=self.wake,
                    dev_root=self._dev_root,
                )
        self.wake()

    def tick(self) -> None:
        """One pass of the watch loop."""
        kubelet_inode = inode(self._kubelet_socket)
        if kubelet_inode is not None and self._kubelet_inode not in (None, kubelet_inode):
            log.info("kubelet.sock was recreated (kubelet restart); re-registering every profile")
        self._kubelet_inode = kubelet_inode
        with self._lock:
            for served in self._served.values():
                served.tick(kubelet_inode)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for every Register on its way to finish (tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            served = list(self._served.values())
        return all([s.join(max(0.0, deadline - time.monotonic())) for s in served])

    def run(self, stop: threading.Event) -> None:
        """The watch loop, until ``stop`` is set (and ``wake()`` called)."""
        with DirWatch(self._kubelet_dir) as watch:
            self._watch = watch
            try:
                while not stop.is_set():
                    self.tick()
                    watch.wait(self._next_wake() if watch.watching else WATCH_INTERVAL_S)
            finally:
                self._watch = None

    def wake(self) -> None:
        """Run the watch loop now (a stream opened or ended, a stop, new profiles)."""
        watch = self._watch
        if watch is not None:
            watch.wake()

    def _next_wake(self) -> float:
        """Seconds until one of the profiles' timers is due, at most ``IDLE_WAKE_S``."""
        now = self._clock()
        with self._lock:
            dues = [d for s in self._served.values() if (d := s.due()) is not None]
        return max(0.0, min([now + IDLE_WAKE_S, *dues]) - now)

    def stop(self) -> None:
        with self._lock:
            for served in self._served.values():
                served.stop()
            self._served.clear()
