"""Prometheus metrics (SPEC 7): off by default, on when ``metricsAddress`` is set.

The servers record events through a :class:`Recorder`: :class:`Metrics` when metrics
are on, :class:`NullMetrics` when they are off. Seat states and GPU health are not
recorded but read at scrape time from providers (the seat board's ``status()`` and
the health monitor's ``gpu_health()``), so they can never drift from the truth.

Series:

- ``kyb_seats{resource,group,state}``: seats per state, all five states (zeros too)
- ``kyb_seat_holder{namespace,pod,container,resource,seat,group,generation,gpu,UUID}``:
  1 per GPU of each live binding whose holder PodResources has shown (``UUID`` as DCGM
  exporter spells it, to join its GPU metrics on)
- ``kyb_gpu_healthy{gpu,uuid}``: 1 healthy, 0 unhealthy
- ``kyb_allocate_seconds{resource}``, ``kyb_preferred_allocation_seconds{resource}``:
  latency histograms
- ``kyb_allocate_errors_total{resource}``: refused or failed Allocate calls
- ``kyb_registrations_total{resource,kind}``: ``first`` registration or ``again``
- ``kyb_config_reloads_total{result}``: ``accepted`` or ``rejected``

``prometheus_client`` (and the HTTP server) are imported only when metrics are on: the
serving process does not pay their memory when it has no metrics address.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SEAT_STATES: tuple[str, ...] = ("free", "held", "fenced", "drained", "unhealthy")

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
"""Allocate answers from memory in well under a millisecond; 100 ms is already slow."""

StatusProvider = Callable[[], Mapping[str, Any]]
"""Returns the SPEC section 9 status document (``SeatBoard.status``)."""


class GpuHealthView(Protocol):
    """One GPU's health as a provider reports it (``health.monitor.GpuHealth`` fits)."""

    @property
    def index(self) -> int: ...

    @property
    def uuid(self) -> str: ...

    @property
    def healthy(self) -> bool: ...


GpuHealthProvider = Callable[[], Iterable[GpuHealthView]]


class Recorder(Protocol):
    """What the servers report; both :class:`Metrics` and :class:`NullMetrics` fit."""

    def observe_allocate(self, resource: str, seconds: float, ok: bool) -> None: ...

    def observe_preferred(self, resource: str, seconds: float) -> None: ...

    def registered(self, resource: str, first: bool) -> None: ...

    def config_reload(self, accepted: bool) -> None: ...


class NullMetrics:
    """The recorder when metrics are off: every call does nothing."""

    def observe_allocate(self, resource: str, seconds: float, ok: bool) -> None:
        pass

    def observe_preferred(self, resource: str, seconds: float) -> None:
        pass

    def registered(self, resource: str, first: bool) -> None:
        pass

    def config_reload(self, accepted: bool) -> None:
        pass


class Metrics:
    """The plugin's metrics in their own registry (never the process-global one)."""

    def __init__(
        self,
        *,
        status: StatusProvider | None = None,
        gpu_health: GpuHealthProvider | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self._allocate = Histogram(
            "kyb_allocate_seconds",
            "Time to answer an Allocate call.",
            ["resource"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._preferred = Histogram(
            "kyb_preferred_allocation_seconds",
            "Time to answer a GetPreferredAllocation call.",
            ["resource"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._allocate_errors = Counter(
            "kyb_allocate_errors",
            "Allocate calls refused or failed.",
            ["resource"],
            registry=self.registry,
        )
        self._registrations = Counter(
            "kyb_registrations",
            "Registrations with the kubelet: the first one (first) or after a restart (again).",
            ["resource", "kind"],
            registry=self.registry,
        )
        self._reloads = Counter(
            "kyb_config_reloads",
            "Config file reloads: applied (accepted) or kept the old config (rejected).",
            ["result"],
            registry=self.registry,
        )
        self.registry.register(cast("Collector", _StateCollector(status, gpu_health)))

    def observe_allocate(self, resource: str, seconds: float, ok: bool) -> None:
        self._allocate.labels(resource).observe(seconds)
        if not ok:
            self._allocate_errors.labels(resource).inc()

    def observe_preferred(self, resource: str, seconds: float) -> None:
        self._preferred.labels(resource).observe(seconds)

    def registered(self, resource: str, first: bool) -> None:
        self._registrations.labels(resource, "first" if first else "again").inc()

    def config_reload(self, accepted: bool) -> None:
        self._reloads.labels("accepted" if accepted else "rejected").inc()

    def serve(self, address: str) -> MetricsServer:
        """Serve ``/metrics`` over HTTP on ``HOST:PORT`` (port 0: any free port)."""
        return MetricsServer(self.registry, *parse_address(address))


class MetricsServer:
    """A running metrics endpoint on its own thread; ``stop`` closes its socket.

    Not ``prometheus_client.start_http_server``: its server polls for shutdown only
    every half second, which would slow down every stop of the plugin.
    """

    _POLL_S = 0.05

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from wsgiref.simple_server import make_server

        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type("_Server", (ThreadingWSGIServer,), {"address_family": family})
        self._server: WSGIServer = make_server(
            str(sockaddr[0]), port, make_wsgi_app(registry), server_class, _quiet_handler()
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": self._POLL_S},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0)."""
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(1.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _quiet_handler() -> type[WSGIRequestHandler]:
    from wsgiref.simple_server import WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not worth a log line each."""

    return QuietHandler


_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]*)):(?P<port>\d+)$")


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port)."""
    match = _ADDRESS.match(address.strip())
    if match is None or int(match["port"]) > 65535:
        raise ValueError(f"metrics address must be HOST:PORT, got {address!r}")
    host = match["v6"] or match["host"] or "0.0.0.0"
    return host, int(match["port"])


class _StateCollector:
    """Reads seat states and GPU health from their providers at scrape time (a
    ``prometheus_client`` collector by shape: the registry only calls these methods)."""

    def __init__(self, status: StatusProvider | None, gpu_health: GpuHealthProvider | None):
        self._status = status
        self._gpu_health = gpu_health
        self._failing: set[str] = set()

    def describe(self) -> Iterable[Metric]:
        # Describing without reading the providers keeps registration cheap and safe.
        return [_seats_family(), _holders_family(), _gpu_family()]

    def collect(self) -> Iterable[Metric]:
        status, gpu_health = self._status, self._gpu_health
        if status is not None:
            yield from self._read("seat states", lambda: _seat_families(status()))
        if gpu_health is not None:
            yield from self._read("GPU health", lambda: [_gpu_health(gpu_health())])

    def _read(self, what: str, build: Callable[[], list[Metric]]) -> list[Metric]:
        # A broken provider must not fail the whole scrape; say so once, not per scrape.
        try:
            metrics = build()
        except Exception as exc:
            if what not in self._failing:
                log.warning("metrics: cannot read %s (%s)", what, exc, exc_info=True)
                self._failing.add(what)
            return []
        if what in self._failing:
            log.info("metrics: reading %s works again", what)
            self._failing.discard(what)
        return metrics


def _seats_family() -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(
        "kyb_seats", "Seats per resource, group and state.", labels=["resource", "group", "state"]
    )


HOLDER_LABELS = (
    "namespace",
    "pod",
    "container",
    "resource",
    "seat",
    "group",
    "generation",
    "gpu",
    "UUID",
)


def _holders_family() -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(
        "kyb_seat_holder",
        "1 per GPU of each seat bound to a known container (join DCGM metrics on UUID).",
        labels=HOLDER_LABELS,
    )


def _gpu_family() -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(
        "kyb_gpu_healthy", "1 if the GPU is healthy, 0 if not.", labels=["gpu", "uuid"]
    )


def _seat_families(doc: Mapping[str, Any]) -> list[Metric]:
    """Seats per state, and each known holder once per GPU of its seat."""
    seats, holders = _seats_family(), _holders_family()
    for resource, body in sorted((doc.get("resources") or {}).items()):
        for group, entry in sorted((body.get("groups") or {}).items()):
            gpus = [str(i) for i in entry.get("gpus") or ()]
            uuids = entry.get("uuids") or ()
            # A group only a binding keeps lists no UUID for a GPU the topology lost.
            if len(uuids) != len(gpus):
                uuids = [""] * len(gpus)
            counts = dict.fromkeys(SEAT_STATES, 0)
            for seat_id, seat in sorted((entry.get("seats") or {}).items()):
                state = seat.get("state")
                if state in counts:
                    counts[state] += 1
                holder = seat.get("holder")
                if holder:
                    who = [holder["namespace"], holder["pod"], holder["container"]]
                    where = [resource, seat_id, group, str(seat.get("generation"))]
                    for gpu, uuid in zip(gpus, uuids, strict=True):
                        holders.add_metric([*who, *where, gpu, uuid], 1)
            for state in SEAT_STATES:
                seats.add_metric([resource, group, state], counts[state])
    return [seats, holders]


def _gpu_health(gpus: Iterable[GpuHealthView]) -> Metric:
    family = _gpu_family()
    for gpu in sorted(gpus, key=lambda g: (g.index, g.uuid)):
        family.add_metric([str(gpu.index), gpu.uuid], 1 if gpu.healthy else 0)
    return family
