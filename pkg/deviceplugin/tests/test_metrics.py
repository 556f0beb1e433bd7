"""The metrics endpoint, scraped over real HTTP on an ephemeral localhost port."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pkg.deviceplugin.metrics import (
    Metrics,
    MetricsServer,
    NullMetrics,
    Recorder,
    parse_address,
)

R2 = "kyb.ai/gpu-2x-seat"
R1 = "kyb.ai/gpu-1x-seat"
STATES = ("free", "held", "fenced", "drained", "unhealthy")

STATUS: dict[str, Any] = {
    "resources": {
        R2: {
            "groups": {
                "G01": {
                    "gpus": [0, 1],
                    "uuids": ["GPU-a", "GPU-b"],
                    "health": "Healthy",
                    "seats": {
                        "G01-s0": {
                            "state": "held",
                            "generation": 3,
                            "holder": {"namespace": "ml", "pod": "train-0", "container": "main"},
                        },
                        "G01-s1": {"state": "free", "generation": 0},
                        "G01-s2": {"state": "held", "generation": 1},
                    },
                },
                "G23": {
                    "gpus": [2, 3],
                    "uuids": ["GPU-c", "GPU-d"],
                    "health": "Unhealthy",
                    "seats": {
                        "G23-s0": {"state": "unhealthy", "generation": 0, "why": "GPU 2 lost"},
                    },
                },
            }
        }
    }
}


@dataclass(frozen=True)
class Health:
    index: int
    uuid: str
    healthy: bool


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: MetricsServer) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def status() -> dict[str, Any]:
    return {"doc": STATUS}


@pytest.fixture
def metrics(status: dict[str, Any]) -> Metrics:
    return Metrics(
        status=lambda: status["doc"],
        gpu_health=lambda: [Health(1, "GPU-b", True), Health(0, "GPU-a", False)],
    )


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    with metrics.serve("127.0.0.1:0") as server:
        yield server


def test_seat_gauge_counts_every_state_per_group_with_zeros(
    server: MetricsServer, status: dict[str, Any]
) -> None:
    samples = scrape(server)
    g01 = {s: value(samples, "kyb_seats", resource=R2, group="G01", state=s) for s in STATES}
    assert g01 == {"free": 1, "held": 2, "fenced": 0, "drained": 0, "unhealthy": 0}
    assert value(samples, "kyb_seats", resource=R2, group="G23", state="unhealthy") == 1
    assert value(samples, "kyb_seats", resource=R2, group="G23", state="free") == 0

    # Read at scrape time: a new status shows on the next scrape, old groups vanish.
    status["doc"] = {
        "resources": {
            R1: {"groups": {"G0": {"seats": {"G0-s0": {"state": "drained", "generation": 0}}}}}
        }
    }
    samples = scrape(server)
    assert value(samples, "kyb_seats", resource=R1, group="G0", state="drained") == 1
    assert value(samples, "kyb_seats", resource=R2, group="G01", state="held") is None


def test_each_known_holder_is_one_series_per_gpu_of_its_seat_joinable_on_uuid(
    server: MetricsServer, status: dict[str, Any]
) -> None:
    """Issue 15 point 4: ``DCGM_FI_DEV_GPU_UTIL * on(UUID) group_left(pod, namespace)
    kyb_seat_holder``. A held seat with no holder yet (G01-s2) has no series."""
    holders = {
        labels: v for (name, labels), v in scrape(server).items() if name == "kyb_seat_holder"
    }
    seat = {"namespace": "ml", "pod": "train-0", "container": "main", "resource": R2}
    seat |= {"seat": "G01-s0", "group": "G01", "generation": "3"}
    assert holders == {
        frozenset({**seat, "gpu": "0", "UUID": "GPU-a"}.items()): 1,
        frozenset({**seat, "gpu": "1", "UUID": "GPU-b"}.items()): 1,
    }

    # Released: the seat's series are gone on the next scrape.
    released = {**STATUS["resources"][R2]["groups"]["G01"]}
    released["seats"] = {**released["seats"], "G01-s0": {"state": "free", "generation": 3}}
    status["doc"] = {"resources": {R2: {"groups": {"G01": released}}}}
    assert not any(name == "kyb_seat_holder" for name, _ in scrape(server))


def test_gpu_health_gauge_is_one_for_healthy_and_zero_for_unhealthy(
    server: MetricsServer,
) -> None:
    samples = scrape(server)
    assert value(samples, "kyb_gpu_healthy", gpu="0", uuid="GPU-a") == 0
    assert value(samples, "kyb_gpu_healthy", gpu="1", uuid="GPU-b") == 1


def test_allocate_latency_and_errors_are_counted_per_resource(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.observe_allocate(R2, 0.0003, ok=True)
    metrics.observe_allocate(R2, 0.002, ok=False)
    metrics.observe_preferred(R2, 0.00004)
    samples = scrape(server)
    assert value(samples, "kyb_allocate_seconds_count", resource=R2) == 2
    assert value(samples, "kyb_allocate_seconds_sum", resource=R2) == pytest.approx(0.0023)
    assert value(samples, "kyb_allocate_seconds_bucket", resource=R2, le="0.0005") == 1
    assert value(samples, "kyb_allocate_seconds_bucket", resource=R2, le="0.0025") == 2
    assert value(samples, "kyb_allocate_seconds_bucket", resource=R2, le="0.1") == 2
    assert value(samples, "kyb_allocate_errors_total", resource=R2) == 1
    assert value(samples, "kyb_preferred_allocation_seconds_count", resource=R2) == 1
    assert value(samples, "kyb_preferred_allocation_seconds_bucket", resource=R2, le="0.0001") == 1


def test_registrations_and_config_reloads_are_counted_by_kind(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.registered(R2, first=True)
    metrics.registered(R2, first=False)
    metrics.registered(R2, first=False)
    metrics.config_reload(accepted=True)
    metrics.config_reload(accepted=False)
    metrics.config_reload(accepted=False)
    samples = scrape(server)
    assert value(samples, "kyb_registrations_total", resource=R2, kind="first") == 1
    assert value(samples, "kyb_registrations_total", resource=R2, kind="again") == 2
    assert value(samples, "kyb_config_reloads_total", result="accepted") == 1
    assert value(samples, "kyb_config_reloads_total", result="rejected") == 2


def test_a_failing_provider_drops_its_series_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("board closed")

    metrics = Metrics(status=broken, gpu_health=lambda: [Health(0, "GPU-a", True)])
    with metrics.serve("127.0.0.1:0") as server:
        scrape(server)
        samples = scrape(server)
    assert value(samples, "kyb_gpu_healthy", gpu="0", uuid="GPU-a") == 1
    assert not any(name == "kyb_seats" for name, _ in samples)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["metrics: cannot read seat states (board closed)"]


def test_two_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.config_reload(accepted=True)
    assert a.registry.get_sample_value("kyb_config_reloads_total", {"result": "accepted"}) == 1
    assert b.registry.get_sample_value("kyb_config_reloads_total", {"result": "accepted"}) is None


def test_stop_closes_the_port() -> None:
    server = Metrics().serve("127.0.0.1:0")
    port = server.port
    server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_null_metrics_take_the_same_calls() -> None:
    recorders: list[Recorder] = [NullMetrics(), Metrics()]
    for recorder in recorders:
        recorder.observe_allocate(R1, 0.001, ok=False)
        recorder.observe_preferred(R1, 0.001)
        recorder.registered(R1, first=True)
        recorder.config_reload(accepted=False)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:9400", ("127.0.0.1", 9400)),
        (":9400", ("0.0.0.0", 9400)),
        ("[::]:9400", ("::", 9400)),
        ("node-1.local:0", ("node-1.local", 0)),
    ],
)
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("bad", ["9400", "host:", "host:70000", "[::1:9400"])
def test_parse_address_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(bad)
