"""One gRPC server per profile: serving, registering, and surviving kubelet restarts.

The kubelet may be absent at start, may restart at any time (it wipes the socket
directory and creates a new ``kubelet.sock``), and may be slow. A watch loop checks
every ``WATCH_INTERVAL_S`` that each profile's socket is still ours and that
``kubelet.sock`` is the one we registered with; otherwise it re-serves and re-registers.
Registration retries back off up to ``MAX_BACKOFF_S``; a new ``kubelet.sock`` resets the
backoff so a restarted kubelet sees every profile again within a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc
from pkg.deviceplugin.metrics import NullMetrics, Recorder
from pkg.deviceplugin.server import registration
from pkg.deviceplugin.server.plugin import SeatPlugin
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.types import ResourceName, socket_name_of

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
SERVER_WORKERS = 16


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class _Served:
    resource: ResourceName
    path: Path
    server: grpc.Server
    servicer: SeatPlugin
    inode: int | None
    registered_with: int | None = None
    next_attempt: float = 0.0
    backoff: float = FIRST_BACKOFF_S
    last_error: str | None = None
    registrations: int = 0


class PluginManager:
    def __init__(
        self,
        board: SeatBoard,
        kubelet_dir: Path,
        pod_resources: PodResourcesClient | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        recorder: Recorder | None = None,
    ) -> None:
        self._board = board
        self._kubelet_dir = kubelet_dir
        self._kubelet_socket = kubelet_dir / registration.KUBELET_SOCKET
        self._pod_resources = pod_resources
        self._clock = clock
        self._recorder = recorder or NullMetrics()
        self._served: dict[ResourceName, _Served] = {}
        self._lock = threading.Lock()
        self._kubelet_inode: int | None = None

    @property
    def resources(self) -> list[ResourceName]:
        with self._lock:
            return sorted(self._served)

    def registered(self) -> dict[ResourceName, bool]:
        with self._lock:
            return {r: s.registered_with is not None for r, s in self._served.items()}

    def sync(self) -> None:
        """Serve exactly the board's profiles: start new ones, stop removed ones."""
        wanted = set(self._board.layout.profiles)
        with self._lock:
            for resource in sorted(set(self._served) - wanted):
                log.info("profile removed; stopping its server", extra={"resource": resource})
                self._stop_one(self._served.pop(resource))
            for resource in sorted(wanted - set(self._served)):
                self._served[resource] = self._serve(resource)

    def tick(self) -> None:
        """One pass of the watch loop."""
        now = self._clock()
        kubelet_inode = _inode(self._kubelet_socket)
        kubelet_changed = kubelet_inode is not None and kubelet_inode != self._kubelet_inode
        if kubelet_changed and self._kubelet_inode is not None:
            log.info("kubelet.sock was recreated (kubelet restart); re-registering every profile")
        self._kubelet_inode = kubelet_inode
        with self._lock:
            for resource, served in list(self._served.items()):
                if _inode(served.path) != served.inode:
                    log.info(
                        "plugin socket %s was removed; serving it again",
                        served.path,
                        extra={"resource": resource},
                    )
                    self._stop_one(served, remove_socket=False)
                    served = self._served[resource] = self._serve(resource)
                if kubelet_changed:
                    served.next_attempt = now
                    served.backoff = FIRST_BACKOFF_S
                stale = served.registered_with != kubelet_inode
                if kubelet_inode is not None and stale and now >= served.next_attempt:
                    self._register(served, kubelet_inode, now)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.tick()
            stop.wait(WATCH_INTERVAL_S)

    def stop(self) -> None:
        with self._lock:
            for served in self._served.values():
                self._stop_one(served)
            self._served.clear()

    def _serve(self, resource: ResourceName) -> _Served:
        path = self._kubelet_dir / socket_name_of(resource)
        self._kubelet_dir.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        servicer = SeatPlugin(resource, self._board, self._pod_resources, self._recorder)
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=SERVER_WORKERS, thread_name_prefix=f"dp-{socket_name_of(resource)}"
            )
        )
        api_pb2_grpc.add_DevicePluginServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix://{path}")
        server.start()
        log.info("serving on %s", path, extra={"resource": resource})
        return _Served(resource, path, server, servicer, _inode(path))

    def _register(self, served: _Served, kubelet_inode: int, now: float) -> None:
        try:
            registration.register(self._kubelet_socket, served.resource, served.path.name)
        except registration.RegistrationError as exc:
            message = str(exc)
            if message != served.last_error:
                log.warning(
                    "registration with the kubelet failed (%s); retrying with backoff up to %gs",
                    message,
                    MAX_BACKOFF_S,
                    extra={"resource": served.resource},
                )
                served.last_error = message
            served.next_attempt = now + served.backoff
            served.backoff = min(served.backoff * 2, MAX_BACKOFF_S)
            return
        served.registered_with = kubelet_inode
        served.last_error = None
        served.backoff = FIRST_BACKOFF_S
        served.registrations += 1
        log.info(
            "registered with the kubelet (%s)",
            "first time" if served.registrations == 1 else f"#{served.registrations}",
            extra={"resource": served.resource},
        )
        self._recorder.registered(served.resource, first=served.registrations == 1)

    def _stop_one(self, served: _Served, *, remove_socket: bool = True) -> None:
        served.servicer.stop()
        served.server.stop(grace=None)
        if remove_socket and _inode(served.path) == served.inode and served.inode is not None:
            with contextlib.suppress(OSError):
                served.path.unlink()
