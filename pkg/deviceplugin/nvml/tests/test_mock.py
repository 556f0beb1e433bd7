"""MockBackend: the topology file served as NVML would, scripted faults on a fake clock."""

from __future__ import annotations

import threading
import time

import pytest

from pkg.deviceplugin.nvml import fixtures
from pkg.deviceplugin.nvml.backend import Backend, NvmlError, XidEvent
from pkg.deviceplugin.nvml.mock import MockBackend
from pkg.deviceplugin.nvml.topofile import load_topology_file


class FakeClock:
    """Time that moves only when someone sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def flaky() -> tuple[MockBackend, FakeClock]:
    clock = FakeClock()
    return MockBackend.from_name_or_path("flaky-4", clock=clock, sleep=clock.sleep), clock


def test_mock_backend_satisfies_the_backend_protocol() -> None:
    backend: Backend = MockBackend.from_name_or_path("single-gpu")
    backend.close()


@pytest.mark.parametrize("name", fixtures.FIXTURES)
def test_discover_returns_the_files_topology_before_any_fault(name: str) -> None:
    clock = FakeClock()
    backend = MockBackend.from_name_or_path(name, clock=clock, sleep=clock.sleep)
    expected = load_topology_file(fixtures.fixture_path(name)).topology()
    assert backend.discover() == expected
    assert all(backend.probe(g.uuid).ok for g in expected.gpus)


def test_a_lost_gpu_vanishes_from_discovery_and_fails_probes_until_it_recovers() -> None:
    backend, clock = flaky()
    uuid2 = backend.discover().gpu(2).uuid
    clock.now += 0.999
    assert 2 in backend.discover().indices
    clock.now += 0.001
    topo = backend.discover()
    assert topo.indices == (0, 1, 3)
    assert all(2 not in pair for pair in topo.links)
    probe = backend.probe(uuid2)
    assert not probe.ok and "lost" in probe.reason
    clock.now += 2.0  # at 3.0 s: recoverAfter 2.0 s has passed
    assert backend.discover().indices == (0, 1, 2, 3)
    assert backend.probe(uuid2).ok


def test_a_lost_fault_without_recover_after_lasts_forever() -> None:
    tf = load_topology_file(fixtures.fixture_path("flaky-4"))
    data = tf.to_data()
    data["faults"] = [{"gpu": 0, "at": 0.0, "kind": "lost"}]
    clock = FakeClock()
    backend = MockBackend(type(tf).model_validate(data), clock=clock)
    clock.now += 1e9
    assert backend.discover().indices == (1, 2, 3)


def test_probing_an_unknown_uuid_fails_with_a_reason_instead_of_raising() -> None:
    backend, _ = flaky()
    probe = backend.probe("GPU-does-not-exist")
    assert (probe.ok, probe.reason) == (False, "no GPU with UUID GPU-does-not-exist")


def test_xid_events_arrive_once_when_their_time_comes_without_real_sleeping() -> None:
    backend, clock = flaky()
    uuid1 = backend.discover().gpu(1).uuid
    assert backend.wait_xid_events(1.0) == []
    assert clock.now == pytest.approx(101.0)
    assert backend.wait_xid_events(10.0) == [XidEvent(uuid1, 79)]
    assert clock.now == pytest.approx(101.5)  # woke at the event, not at the timeout
    assert backend.wait_xid_events(5.0) == []
    assert clock.now == pytest.approx(106.5)


def test_a_zero_timeout_polls_without_sleeping() -> None:
    backend, clock = flaky()
    assert backend.wait_xid_events(0) == []
    assert clock.sleeps == []
    clock.now += 2
    assert [e.xid for e in backend.wait_xid_events(0)] == [79]


def test_fixtures_without_faults_never_report_events() -> None:
    clock = FakeClock()
    backend = MockBackend.from_name_or_path("dgx-a100", clock=clock, sleep=clock.sleep)
    assert backend.wait_xid_events(3600) == []
    assert clock.now == pytest.approx(3700.0)


def test_each_event_goes_to_exactly_one_of_several_waiting_threads() -> None:
    backend = MockBackend.from_name_or_path("flaky-4")
    seen: list[XidEvent] = []

    def wait() -> None:
        seen.extend(backend.wait_xid_events(2.0))

    threads = [threading.Thread(target=wait) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.xid for e in seen] == [79]


def test_close_wakes_a_blocked_waiter_and_ends_the_backend() -> None:
    backend = MockBackend.from_name_or_path("dgx-a100")
    result: list[list[XidEvent]] = []
    waiter = threading.Thread(target=lambda: result.append(backend.wait_xid_events(30)))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.05)
    backend.close()
    waiter.join(5)
    assert result == [[]]
    assert time.monotonic() - started < 5
    with pytest.raises(NvmlError, match="closed"):
        backend.discover()


def test_from_name_or_path_reports_unknown_names() -> None:
    with pytest.raises(NvmlError, match="neither a built-in fixture"):
        MockBackend.from_name_or_path("nope")
