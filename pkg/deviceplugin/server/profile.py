"""One profile's gRPC server: its socket, its registration, the kubelet's stream on it.

A ``ProfileServer`` serves one seat resource on ``<kubelet dir>/<socket name>`` and
registers it with the ``kubelet.sock`` there. ``tick`` moves it on; its states are

- ``SERVING``: on its socket, not registered with the ``kubelet.sock`` there now;
- ``REGISTERING``: a ``Register`` on its way, in the profile's own thread, so one slow
  ``Register`` delays no other profile;
- ``REGISTERED``: registered with the ``kubelet.sock`` there now;
- ``STOPPED``.

A socket that was removed or replaced (a kubelet restart wipes the directory) is served
again at the next tick, and registered again. Registration retries back off up to
``MAX_BACKOFF_S``; a new ``kubelet.sock`` resets the backoff, so a restarted kubelet
sees every profile again within a second.

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
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
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

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# A registered profile whose ListAndWatch streams all ended this long ago lost the
# kubelet; one that never got a stream this long after registering was not registered.
STREAM_LOST_S = 1.0
NO_STREAM_S = 10.0
ALREADY_CONNECTED = "already connected"


class State(enum.Enum):
    SERVING = "serving"
    REGISTERING = "registering"
    REGISTERED = "registered"
    STOPPED = "stopped"


def inode(path: Path) -> int | None:
    """The inode of ``path`` (None: absent): a socket recreated has a new one."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class ProfileServer:
    """One profile's gRPC server and its registration with the kubelet; thread-safe."""

    def __init__(
        self,
        resource: ResourceName,
        board: SeatBoard,
        pod_resources: PodResourcesClient | None,
        kubelet_dir: Path,
        *,
        workers: int,
        recorder: Recorder | None = None,
        clock: Callable[[], float] = time.monotonic,
        register_timeout_s: float = registration.TIMEOUT_S,
        on_change: Callable[[], None] = lambda: None,
        dev_root: Path = Path("/"),
    ) -> None:
        """Serves at once. ``workers``: the gRPC server's threads. ``on_change`` is
        called when ``tick`` may have something new to do: a ListAndWatch stream opened
        or ended, a Register returned."""
        self.resource = resource
        self.path = kubelet_dir / socket_name_of(resource)
        self._kubelet_dir = kubelet_dir
        self._kubelet_socket = kubelet_dir / registration.KUBELET_SOCKET
        self._board = board
        self._pod_resources = pod_resources
        self._workers = workers
        self._recorder = recorder or NullMetrics()
        self._clock = clock
        self._register_timeout_s = register_timeout_s
        self._dev_root = dev_root
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stopped = False
        # The kubelet.sock the last tick saw; Registers taken over every serving.
        self._kubelet: int | None = None
        self._registrations = 0
        self._serve()

    def _serve(self) -> None:
        """Serve the socket afresh: a new server, nothing registered yet."""
        self._kubelet_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self._servicer = SeatPlugin(
            self.resource,
            self._board,
            self._pod_resources,
            self._recorder,
            on_streams=self._on_change,
            dev_root=self._dev_root,
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix=f"dp-{self.path.name}"
            )
        )
        api_pb2_grpc.add_DevicePluginServicer_to_server(self._servicer, self._server)
        self._server.add_insecure_port(f"unix://{self.path}")
        self._server.start()
        log.info("serving on %s", self.path, extra={"resource": self.resource})
        self._inode = inode(self.path)
        self._registered_with: int | None = None
        self._next_attempt = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._last_error: str | None = None
        self._attempt: threading.Thread | None = None
        self._registered_at = 0.0
        self._streams_at_registration = 0
        # Since when a registered profile has had no ListAndWatch stream (None: has one).
        self._streamless_since: float | None = None

    @property
    def servicer(self) -> SeatPlugin:
        with self._lock:
            return self._servicer

    @property
    def registered(self) -> bool:
        """Whether the kubelet took a Register since the socket was last served (the
        kubelet there now or the one before it)."""
        with self._lock:
            return self._registered_with is not None

    @property
    def state(self) -> State:
        with self._lock:
            return self._state()

    def _state(self) -> State:
        if self._stopped:
            return State.STOPPED
        if self._attempt is not None:
            return State.REGISTERING
        if self._registered_with is not None and self._registered_with == self._kubelet:
            return State.REGISTERED
        return State.SERVING

    def tick(self, kubelet: int | None) -> None:
        """One step, given the inode of the ``kubelet.sock`` there now (None: none)."""
        with self._lock:
            if self._stopped:
                return
            now = self._clock()
            if inode(self.path) != self._inode:
                log.info(
                    "plugin socket %s was removed; serving it again",
                    self.path,
                    extra={"resource": self.resource},
                )
                self._stop_serving(remove_socket=False)
                self._serve()
            if kubelet is not None and kubelet != self._kubelet:
                self._next_attempt = now
                self._backoff = FIRST_BACKOFF_S
            self._kubelet = kubelet
            state = self._state()
            if state is State.REGISTERING:
                return
            if state is State.REGISTERED:
                self._notice_lost_stream(now)
            else:
                self._streamless_since = None
            stale = self._registered_with != kubelet
            if kubelet is not None and stale and now >= self._next_attempt:
                self._start_attempt(kubelet)

    def due(self) -> float | None:
        """When, by the clock, ``tick`` has something to do next (None: only after a
        change of ``kubelet.sock`` or ``on_change``)."""
        with self._lock:
            state = self._state()
            if state is State.STOPPED or state is State.REGISTERING:
                return None  # a Register's end calls on_change
            if state is State.SERVING:
                return self._next_attempt if self._kubelet is not None else None
            if self._streamless_since is not None:
                return self._streamless_since + STREAM_LOST_S
            if self._servicer.counts().streams_opened <= self._streams_at_registration:
                return self._registered_at + NO_STREAM_S
            return None

    def join(self, timeout_s: float) -> bool:
        """Wait for the Register on its way, if any; whether none is left."""
        with self._lock:
            attempt = self._attempt
        if attempt is None:
            return True
        attempt.join(timeout_s)
        return not attempt.is_alive()

    def stop(self) -> None:
        """Stop serving and remove the socket (when it is still ours)."""
        with self._lock:
            self._stopped = True
            self._stop_serving(remove_socket=True)

    def _stop_serving(self, *, remove_socket: bool) -> None:
        self._servicer.stop()
        self._server.stop(grace=None)
        if remove_socket and self._inode is not None and inode(self.path) == self._inode:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _notice_lost_stream(self, now: float) -> None:
        # The kubelet opens one stream after each Register: the first one numbered after
        # the registration began is its. Other clients' streams do not stand in for it
        # (they may have pushed it out, plugin.MAX_STREAMS). With none since, an earlier
        # stream still open is the kubelet's (a Register answered "already connected").
        counts = self._servicer.counts()
        kubelets = self._streams_at_registration + 1
        since = counts.streams_opened >= kubelets
        alive = kubelets in counts.open_streams if since else bool(counts.open_streams)
        if alive:
            self._streamless_since = None
            return
        if since:
            if self._streamless_since is None:
                self._streamless_since = now
            if now - self._streamless_since < STREAM_LOST_S:
                return
            why = "the kubelet's ListAndWatch stream ended and the kubelet does not reconnect"
        elif now - self._registered_at >= NO_STREAM_S:
            why = f"the kubelet opened no ListAndWatch stream in {NO_STREAM_S:g}s"
        else:
            return
        log.warning("%s; registering again", why, extra={"resource": self.resource})
        self._registered_with = None
        self._streamless_since = None
        self._next_attempt = now

    def _start_attempt(self, kubelet: int) -> None:
        self._attempt = threading.Thread(
            target=self._register,
            args=(self._servicer, kubelet),
            name=f"register-{self.path.name}",
            daemon=True,
        )
        self._attempt.start()

    def _register(self, servicer: SeatPlugin, kubelet: int) -> None:
        """One Register call, in its own thread; records the outcome under the lock
        unless the socket was served again or stopped meanwhile."""
        before = servicer.counts()
        error: str | None = None
        try:
            registration.register(
                self._kubelet_socket,
                self.resource,
                self.path.name,
                timeout_s=self._register_timeout_s,
            )
        except registration.RegistrationError as exc:
            error = str(exc)
        dialed_back = servicer.counts().options_asked > before.options_asked
        with self._lock:
            self._on_change()  # the loop's timers may have changed
            if self._stopped or servicer is not self._servicer:
                return
            self._attempt = None
            now = self._clock()
            if error is not None and (ALREADY_CONNECTED in error or dialed_back):
                if error != self._last_error:
                    log.warning(
                        "Register failed (%s), but %s: counting the profile as registered "
                        "and not asking again",
                        error,
                        "the kubelet holds this socket already"
                        if ALREADY_CONNECTED in error
                        else "the kubelet dialed back and asked for the options",
                        extra={"resource": self.resource},
                    )
            elif error is not None:
                if error != self._last_error:
                    log.warning(
                        "registration with the kubelet failed (%s); retrying with backoff "
                        "up to %gs",
                        error,
                        MAX_BACKOFF_S,
                        extra={"resource": self.resource},
                    )
                self._last_error = error
                self._next_attempt = now + self._backoff
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
                return
            self._registered_with = kubelet
            self._registered_at = now
            self._streams_at_registration = before.streams_opened
            self._last_error = error
            self._backoff = FIRST_BACKOFF_S
            self._registrations += 1
            registrations = self._registrations
        log.info(
            "registered with the kubelet (%s)",
            "first time" if registrations == 1 else f"#{registrations}",
            extra={"resource": self.resource},
        )
        self._recorder.registered(self.resource, first=registrations == 1)
