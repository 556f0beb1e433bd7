"""One gRPC server per profile: serving, registering, and surviving kubelet restarts.

The kubelet may be absent at start, may restart at any time (it wipes the socket
directory and creates a new ``kubelet.sock``), and may be slow. A watch loop checks
that each profile's socket is still ours and that ``kubelet.sock`` is the one we
registered with; otherwise it re-serves and re-registers. It runs every
``WATCH_INTERVAL_S`` and at once when an entry of the kubelet's directory appears,
goes or is renamed (inotify): a restarted kubelet re-admits its running pods within
about 100 ms of serving ``kubelet.sock``, and refuses (and so kills) a pod whose init
container holds one of our seats unless the profile is registered by then (README,
"Kubelet restarts"; kubernetes issues 124345 and 138446).
Registration retries back off up to ``MAX_BACKOFF_S``; a new ``kubelet.sock`` resets the
backoff so a restarted kubelet sees every profile again within a second.

Each profile registers in its own thread, so one slow ``Register`` delays no other.
The kubelet's device manager does its work inside ``Register`` (it dials the plugin
back and asks ``GetDevicePluginOptions``) and refuses a second ``Register`` for a
socket it holds, forgetting the live connection as it does (it then never notices
this plugin going away). So a ``Register`` whose answer failed or came late counts
as registered when the kubelet did dial back during it, and so does an answer of
"already connected": in both cases the kubelet has the profile, and asking again can
only hurt. The kubelet never reconnects a ``ListAndWatch`` stream it lost; when the
kubelet's stream (the first opened after the registration) has been gone for
``STREAM_LOST_S`` while ``kubelet.sock`` stayed the same, the profile registers again,
and so it does when no stream came at all within ``NO_STREAM_S`` of a registration (a
dial-back that was not the kubelet's).
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
from pkg.deviceplugin.server.dirwatch import DirWatch
from pkg.deviceplugin.server.plugin import SeatPlugin
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.types import ResourceName, socket_name_of

log = logging.getLogger(__name__)

# Where the kubelet directory cannot be watched, the loop polls it this often; where it
# can, it sleeps until the directory changes, a stream opens or ends, a Register returns
# or one of its own timers is due, and at least every IDLE_WAKE_S.
WATCH_INTERVAL_S = 0.1
IDLE_WAKE_S = 60.0
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# Threads per profile's gRPC server. Each ListAndWatch stream holds one for its life:
# the kubelet's (two for a moment across a kubelet restart), so at least two are left
# for Allocate, GetPreferredAllocation and the liveness probe, which the kubelet sends
# one at a time per resource. More threads only take turns at the GIL and keep their
# malloc arenas (bench/README.md measures 4 against 2, 8 and 16).
SERVER_WORKERS = 4
# A registered profile whose ListAndWatch streams all ended this long ago lost the
# kubelet; one that never got a stream this long after registering was not registered.
STREAM_LOST_S = 1.0
NO_STREAM_S = 10.0
ALREADY_CONNECTED = "already connected"


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
    attempt: threading.Thread | None = None
    registered_at: float = 0.0
    streams_at_registration: int = 0
    # Since when a registered profile has had no ListAndWatch stream (None: has one).
    streamless_since: float | None = None


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
    ) -> None:
        self._board = board
        self._kubelet_dir = kubelet_dir
        self._kubelet_socket = kubelet_dir / registration.KUBELET_SOCKET
        self._pod_resources = pod_resources
        self._clock = clock
        self._recorder = recorder or NullMetrics()
        self._register_timeout_s = register_timeout_s
        self._served: dict[ResourceName, _Served] = {}
        self._lock = threading.Lock()
        self._kubelet_inode: int | None = None
        self._watch: DirWatch | None = None

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
        self.wake()

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
                    registrations = served.registrations
                    served = self._served[resource] = self._serve(resource)
                    served.registrations = registrations  # the next one is "again"
                if kubelet_changed:
                    served.next_attempt = now
                    served.backoff = FIRST_BACKOFF_S
                if served.attempt is not None:
                    continue  # a Register is on its way
                self._notice_lost_stream(served, kubelet_inode, now)
                stale = served.registered_with != kubelet_inode
                if kubelet_inode is not None and stale and now >= served.next_attempt:
                    self._start_attempt(served, kubelet_inode)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for every Register on its way to finish (tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            attempts = [s.attempt for s in self._served.values() if s.attempt is not None]
        for attempt in attempts:
            attempt.join(max(0.0, deadline - time.monotonic()))
        return all(not a.is_alive() for a in attempts)

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
        """Seconds until one of the loop's timers is due, at most ``IDLE_WAKE_S``."""
        now = self._clock()
        due = now + IDLE_WAKE_S
        with self._lock:
            kubelet = self._kubelet_inode
            for served in self._served.values():
                if served.attempt is not None:
                    continue  # its end wakes the loop
                if served.registered_with != kubelet:
                    if kubelet is not None:
                        due = min(due, served.next_attempt)
                elif served.streamless_since is not None:
                    due = min(due, served.streamless_since + STREAM_LOST_S)
                elif served.servicer.streams_opened <= served.streams_at_registration:
                    due = min(due, served.registered_at + NO_STREAM_S)
        return max(0.0, due - now)

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
        servicer = SeatPlugin(
            resource, self._board, self._pod_resources, self._recorder, on_streams=self.wake
        )
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

    def _notice_lost_stream(self, served: _Served, kubelet_inode: int | None, now: float) -> None:
        servicer = served.servicer
        if served.registered_with is None or served.registered_with != kubelet_inode:
            served.streamless_since = None
            return
        # The kubelet opens one stream after each Register: the first one numbered after
        # the registration began is its. Other clients' streams do not stand in for it
        # (they may have pushed it out, plugin.MAX_STREAMS). With none since, an earlier
        # stream still open is the kubelet's (a Register answered "already connected").
        kubelets = served.streams_at_registration + 1
        since = servicer.streams_opened >= kubelets
        alive = servicer.stream_open(kubelets) if since else servicer.streams_active > 0
        if alive:
            served.streamless_since = None
            return
        if since:
            if served.streamless_since is None:
                served.streamless_since = now
            if now - served.streamless_since < STREAM_LOST_S:
                return
            why = "the kubelet's ListAndWatch stream ended and the kubelet does not reconnect"
        elif now - served.registered_at >= NO_STREAM_S:
            why = f"the kubelet opened no ListAndWatch stream in {NO_STREAM_S:g}s"
        else:
            return
        log.warning("%s; registering again", why, extra={"resource": served.resource})
        served.registered_with = None
        served.streamless_since = None
        served.next_attempt = now

    def _start_attempt(self, served: _Served, kubelet_inode: int) -> None:
        served.attempt = threading.Thread(
            target=self._register,
            args=(served, kubelet_inode),
            name=f"register-{socket_name_of(served.resource)}",
            daemon=True,
        )
        served.attempt.start()

    def _register(self, served: _Served, kubelet_inode: int) -> None:
        """One Register call, in its own thread; records the outcome under the lock."""
        dialed_before = served.servicer.options_asked
        streams_before = served.servicer.streams_opened
        error: str | None = None
        try:
            registration.register(
                self._kubelet_socket,
                served.resource,
                served.path.name,
                timeout_s=self._register_timeout_s,
            )
        except registration.RegistrationError as exc:
            error = str(exc)
        dialed_back = served.servicer.options_asked > dialed_before
        with self._lock:
            served.attempt = None
            self.wake()  # the loop's timers may have changed
            if self._served.get(served.resource) is not served:
                return  # stopped meanwhile
            now = self._clock()
            if error is not None and (ALREADY_CONNECTED in error or dialed_back):
                if error != served.last_error:
                    log.warning(
                        "Register failed (%s), but %s: counting the profile as registered "
                        "and not asking again",
                        error,
                        "the kubelet holds this socket already"
                        if ALREADY_CONNECTED in error
                        else "the kubelet dialed back and asked for the options",
                        extra={"resource": served.resource},
                    )
            elif error is not None:
                if error != served.last_error:
                    log.warning(
                        "registration with the kubelet failed (%s); retrying with backoff "
                        "up to %gs",
                        error,
                        MAX_BACKOFF_S,
                        extra={"resource": served.resource},
                    )
                served.last_error = error
                served.next_attempt = now + served.backoff
                served.backoff = min(served.backoff * 2, MAX_BACKOFF_S)
                return
            served.registered_with = kubelet_inode
            served.registered_at = now
            served.streams_at_registration = streams_before
            served.last_error = error
            served.backoff = FIRST_BACKOFF_S
            served.registrations += 1
            first = served.registrations == 1
        log.info(
            "registered with the kubelet (%s)",
            "first time" if first else f"#{served.registrations}",
            extra={"resource": served.resource},
        )
        self._recorder.registered(served.resource, first=first)

    def _stop_one(self, served: _Served, *, remove_socket: bool = True) -> None:
        served.servicer.stop()
        served.server.stop(grace=None)
        if remove_socket and _inode(served.path) == served.inode and served.inode is not None:
            with contextlib.suppress(OSError):
                served.path.unlink()
