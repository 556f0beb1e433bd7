"""The health monitor against the NVML mock, its scripted faults run on a fake clock."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pkg.deviceplugin.health import monitor as monitor_mod
from pkg.deviceplugin.health.monitor import GpuHealth, HealthMonitor
from pkg.deviceplugin.nvml import fixtures
from pkg.deviceplugin.nvml.backend import NvmlError, Probe, XidEvent
from pkg.deviceplugin.nvml.mock import MockBackend
from pkg.deviceplugin.nvml.topofile import load_topology_file
from pkg.deviceplugin.types import Gpu, XidRecovery

UUIDS = ["GPU-00000000-0000-0000-0000-00000000000" + str(i) for i in range(2)]
DEFAULT_IGNORED = (13, 31, 43, 45, 68, 109)
FLAKY_GPU2 = "GPU-5eaa3581-09c1-d080-17cc-e9f0be33a637"
FLAKY_GPU1 = "GPU-ad97e031-9694-efda-b545-15007797c7fc"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance_to(self, started: float, elapsed: float) -> None:
        self.now = started + elapsed


@dataclass
class Changes:
    calls: list[dict[str, str]] = field(default_factory=list)

    def __call__(self, unhealthy: Mapping[str, str]) -> None:
        self.calls.append(dict(unhealthy))


class WatchedChanges(Changes):
    """``Changes`` that a test can wait on while the monitor's threads run."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def __call__(self, unhealthy: Mapping[str, str]) -> None:
        with self._changed:
            super().__call__(unhealthy)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 3.0) -> None:
        """Until one change so far (the monitor's calls, in order) satisfies ``predicate``."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: any(predicate(c) for c in self.calls), timeout=timeout
            ), self.calls


def two_gpu_file(tmp_path: Path, faults: str) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(
        "version: v1\ngpus:\n"
        + "".join(
            f"  - {{index: {i}, uuid: {uuid}, name: Tesla T4, memoryMiB: 15360,\n"
            f'     pciBusId: "00000000:0{i}:00.0", minor: {i}, numaNode: 0}}\n'
            for i, uuid in enumerate(UUIDS)
        )
        + "links:\n  - [X, PHB]\n  - [PHB, X]\n"
        + f"faults:\n{faults}"
    )
    return path


@dataclass
class Rig:
    clock: FakeClock
    backend: MockBackend
    monitor: HealthMonitor
    changes: Changes
    started: float

    def at(self, elapsed: float) -> None:
        """Move the script to ``elapsed`` seconds and run one probe round."""
        self.clock.advance_to(self.started, elapsed)
        self.monitor.probe_once()

    def events_at(self, elapsed: float) -> list[XidEvent]:
        self.clock.advance_to(self.started, elapsed)
        return self.backend.wait_xid_events(0)


def make_rig(
    source: str | Path,
    *,
    healthy_after: int = 3,
    xid_recovery: XidRecovery = "probes",
    backend_type: type[MockBackend] = MockBackend,
) -> Rig:
    clock = FakeClock()
    backend = backend_type(load_topology_file(fixtures.resolve(source)), clock=clock)
    gpus = backend.discover().gpus  # the layout's GPUs: fixed at start
    changes = Changes()
    monitor = HealthMonitor(
        backend,
        lambda: gpus,
        changes,
        probe_interval_s=0.5,
        healthy_after=healthy_after,
        ignored_xids=DEFAULT_IGNORED,
        xid_recovery=xid_recovery,
        clock=clock,
    )
    return Rig(clock, backend, monitor, changes, clock.now)


def health_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pkg.deviceplugin.health" and r.levelno >= level
    ]


def test_flaky_4_lost_gpu_is_unhealthy_on_the_first_bad_probe_and_back_after_three_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "pkg.deviceplugin.health")
    rig = make_rig("flaky-4")
    rig.at(0.0)
    rig.at(0.5)
    assert rig.changes.calls == []

    rig.at(1.0)
    assert rig.changes.calls == [{FLAKY_GPU2: "GPU 2 is lost (fell off the bus)"}]
    for t in (1.5, 2.0, 2.5):
        rig.at(t)
    rig.at(3.0)  # back on the bus: good probe 1
    rig.at(3.5)  # 2
    assert rig.monitor.unhealthy() == {FLAKY_GPU2: "GPU 2 is lost (fell off the bus)"}
    rig.at(4.0)  # 3
    assert rig.changes.calls[-1] == {}
    assert len(rig.changes.calls) == 2

    assert health_lines(caplog, logging.DEBUG) == [
        f"GPU 2 ({FLAKY_GPU2}) unhealthy: GPU 2 is lost (fell off the bus)",
        f"GPU 2 ({FLAKY_GPU2}) healthy again after 3 good probes "
        "(unhealthy 3.0 s: GPU 2 is lost (fell off the bus))",
    ]
    assert [getattr(r, "gpu", None) for r in caplog.records] == [2, 2]


def test_a_bad_probe_between_good_ones_restarts_the_count(tmp_path: Path) -> None:
    rig = make_rig(
        two_gpu_file(
            tmp_path,
            "  - {gpu: 0, at: 1.0, kind: lost, recoverAfter: 1.0}\n"
            "  - {gpu: 0, at: 3.0, kind: lost, recoverAfter: 1.0}\n",
        )
    )
    rig.at(1.0)  # bad
    rig.at(2.0)  # good 1
    rig.at(3.0)  # bad: count starts over
    rig.at(4.0)  # good 1
    rig.at(5.0)  # good 2
    assert set(rig.monitor.unhealthy()) == {UUIDS[0]}
    rig.at(6.0)  # good 3
    assert rig.monitor.unhealthy() == {}
    assert rig.changes.calls == [{UUIDS[0]: "GPU 0 is lost (fell off the bus)"}, {}]


def test_a_critical_xid_marks_at_once_and_an_ignored_xid_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "pkg.deviceplugin.health")
    rig = make_rig(
        two_gpu_file(
            tmp_path,
            "  - {gpu: 0, at: 1.0, kind: xid, xid: 43}\n"
            "  - {gpu: 1, at: 1.0, kind: xid, xid: 79}\n",
        )
    )
    assert rig.events_at(0.5) == []
    events = rig.events_at(1.0)
    assert {(e.uuid, e.xid) for e in events} == {(UUIDS[0], 43), (UUIDS[1], 79)}
    rig.monitor.handle_events(events)

    assert rig.changes.calls == [{UUIDS[1]: "critical XID 79"}]
    assert health_lines(caplog, logging.INFO) == [f"GPU 1 ({UUIDS[1]}) unhealthy: critical XID 79"]
    assert f"GPU 0 ({UUIDS[0]}) reported XID 43, which is ignored" in health_lines(
        caplog, logging.DEBUG
    )


@pytest.mark.parametrize(
    ("xid", "action"), [(79, "none"), (48, "none"), (94, None)], ids=["79-none", "48-none", "94"]
)
def test_an_xid_gpu_comes_back_after_good_probes_counted_from_the_event(
    tmp_path: Path, xid: int, action: str | None
) -> None:
    # The driver's recovery action reads "none", or it has no such field and the XID is
    # one the GPU survives (94: contained ECC error, the application restarts).
    verdict = f", recoveryAction: {action}" if action else ""
    rig = make_rig(
        two_gpu_file(tmp_path, f"  - {{gpu: 1, at: 1.5, kind: xid, xid: {xid}{verdict}}}\n"),
        healthy_after=2,
    )
    rig.at(0.0)
    rig.monitor.handle_events(rig.events_at(1.5))
    assert rig.monitor.unhealthy() == {UUIDS[1]: f"critical XID {xid}"}
    rig.at(2.0)  # good 1
    assert UUIDS[1] in rig.monitor.unhealthy()
    rig.at(2.5)  # good 2
    assert rig.monitor.unhealthy() == {}


@pytest.mark.parametrize("action", [None, "gpuReset", "drainAndReset"])
def test_an_xid_calling_for_a_reset_keeps_the_gpu_unhealthy_and_says_what_it_waits_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, action: str | None
) -> None:
    # Before, 3 good probes (handle and memory info) returned a GPU that needed a reset.
    caplog.set_level(logging.INFO, "pkg.deviceplugin.health")
    verdict = f", recoveryAction: {action}" if action else ""
    rig = make_rig(
        two_gpu_file(tmp_path, f"  - {{gpu: 1, at: 1.0, kind: xid, xid: 79{verdict}}}\n"),
        healthy_after=1,
    )
    rig.monitor.handle_events(rig.events_at(1.0))
    for t in range(2, 12):
        rig.at(float(t))
    assert rig.monitor.unhealthy() == {UUIDS[1]: "critical XID 79"}
    waiting = [line for line in health_lines(caplog) if "calls for a GPU reset" in line]
    assert len(waiting) == 1
    assert ("the driver cannot say" if action is None else "now: ") in waiting[0]


def test_flaky_4_xid_gpu_comes_back_once_the_driver_has_nothing_pending() -> None:
    rig = make_rig("flaky-4", healthy_after=2)
    rig.at(0.0)
    rig.at(1.0)  # GPU 2 lost
    rig.monitor.handle_events(rig.events_at(1.5))  # GPU 1: XID 79, recovery action none
    assert rig.monitor.unhealthy()[FLAKY_GPU1] == "critical XID 79"
    rig.at(2.0)  # good 1 for GPU 1
    assert FLAKY_GPU1 in rig.monitor.unhealthy()
    rig.at(2.5)  # good 2
    assert set(rig.monitor.unhealthy()) == {FLAKY_GPU2}


def test_xid_recovery_never_keeps_the_gpu_unhealthy_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pkg.deviceplugin.health")
    rig = make_rig(
        two_gpu_file(tmp_path, "  - {gpu: 1, at: 1.0, kind: xid, xid: 79, recoveryAction: none}\n"),
        healthy_after=1,
        xid_recovery="never",
    )
    rig.monitor.handle_events(rig.events_at(1.0))
    for t in range(2, 12):
        rig.at(float(t))
    assert rig.monitor.unhealthy() == {UUIDS[1]: "critical XID 79"}
    assert rig.changes.calls == [{UUIDS[1]: "critical XID 79"}]
    assert health_lines(caplog) == [
        f"GPU 1 ({UUIDS[1]}) unhealthy: critical XID 79; xidRecovery is 'never', "
        "so it stays unhealthy until the plugin restarts"
    ]

    # A reload to "probes" lets the pinned GPU recover through its probes.
    rig.monitor.reconfigure(
        probe_interval_s=0.5, healthy_after=1, ignored_xids=DEFAULT_IGNORED, xid_recovery="probes"
    )
    rig.at(12.0)
    assert rig.monitor.unhealthy() == {}


def test_an_xid_on_a_gpu_already_lost_restarts_its_recovery(tmp_path: Path) -> None:
    rig = make_rig(
        two_gpu_file(
            tmp_path,
            "  - {gpu: 0, at: 1.0, kind: lost, recoverAfter: 1.0}\n"
            "  - {gpu: 0, at: 2.5, kind: xid, xid: 79, recoveryAction: none}\n",
        ),
        healthy_after=2,
    )
    rig.at(1.0)  # lost
    rig.at(2.0)  # good 1
    rig.monitor.handle_events(rig.events_at(2.5))
    assert rig.monitor.unhealthy() == {UUIDS[0]: "critical XID 79"}
    rig.at(3.0)  # good 1 again
    assert UUIDS[0] in rig.monitor.unhealthy()
    rig.at(3.5)
    assert rig.monitor.unhealthy() == {}


@pytest.mark.parametrize("recovery", ["probes", "never"])
def test_an_xid_nvml_cannot_name_makes_every_gpu_suspect_until_its_probes_pass(
    tmp_path: Path, recovery: XidRecovery
) -> None:
    # Before, it became a phantom GPU "" marked and probed forever, every real GPU Healthy.
    rig = make_rig(two_gpu_file(tmp_path, "  []\n"), healthy_after=2, xid_recovery=recovery)
    rig.monitor.handle_events([XidEvent("", 79)])
    reason = "critical XID 79 on a GPU NVML could not name"
    assert rig.monitor.unhealthy() == {UUIDS[0]: reason, UUIDS[1]: reason}
    assert "" not in rig.monitor.unhealthy()
    rig.monitor.probe_once()
    assert set(rig.monitor.unhealthy()) == set(UUIDS)
    rig.monitor.probe_once()
    assert rig.monitor.unhealthy() == {}


def test_a_gpu_the_backend_does_not_know_is_unhealthy(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = MockBackend(load_topology_file(two_gpu_file(tmp_path, "  []\n")), clock=clock)
    stranger = Gpu(7, "GPU-unknown", "Tesla T4", 15360, "00000000:99:00.0", 7)
    changes = Changes()
    monitor = HealthMonitor(
        backend,
        lambda: (*backend.discover().gpus, stranger),
        changes,
        probe_interval_s=1.0,
        healthy_after=3,
        ignored_xids=(),
        xid_recovery="probes",
        clock=clock,
    )
    monitor.probe_once()
    assert changes.calls == [{"GPU-unknown": "no GPU with UUID GPU-unknown"}]
    assert monitor.gpu_health() == [
        GpuHealth(0, UUIDS[0], True),
        GpuHealth(1, UUIDS[1], True),
        GpuHealth(7, "GPU-unknown", False, "no GPU with UUID GPU-unknown"),
    ]


def test_a_probe_that_raises_marks_every_gpu_unhealthy(tmp_path: Path) -> None:
    rig = make_rig(two_gpu_file(tmp_path, "  []\n"))
    rig.at(0.0)
    rig.backend.close()
    rig.at(1.0)
    reason = "probe failed: the NVML mock backend is closed"
    assert rig.changes.calls == [{UUIDS[0]: reason, UUIDS[1]: reason}]


def test_on_change_is_called_only_when_the_unhealthy_set_changes() -> None:
    rig = make_rig("flaky-4", healthy_after=1)
    for step in range(0, 12):
        rig.at(step * 0.5)
        rig.monitor.handle_events(rig.backend.wait_xid_events(0))
    assert rig.changes.calls == [
        {FLAKY_GPU2: "GPU 2 is lost (fell off the bus)"},
        {FLAKY_GPU2: "GPU 2 is lost (fell off the bus)", FLAKY_GPU1: "critical XID 79"},
        {FLAKY_GPU2: "GPU 2 is lost (fell off the bus)"},  # GPU 1 passes its probe at 2.0
        {},  # GPU 2 back at 3.0
    ]


class _XidDuringProbe(MockBackend):
    """Delivers an XID to the monitor while a probe round is under way."""

    monitor: HealthMonitor | None = None

    def probe(self, uuid: str) -> Probe:
        if self.monitor is not None and uuid == UUIDS[1]:
            monitor, self.monitor = self.monitor, None
            monitor.handle_events([XidEvent(uuid, 94)])
        return super().probe(uuid)


def test_a_probe_that_began_before_an_xid_does_not_count_towards_recovery(
    tmp_path: Path,
) -> None:
    rig = make_rig(two_gpu_file(tmp_path, "  []\n"), healthy_after=1, backend_type=_XidDuringProbe)
    assert isinstance(rig.backend, _XidDuringProbe)
    rig.backend.monitor = rig.monitor
    rig.at(0.0)
    assert rig.monitor.unhealthy() == {UUIDS[1]: "critical XID 94"}
    rig.at(1.0)
    assert rig.monitor.unhealthy() == {}


def test_an_unhealthy_gpu_that_leaves_the_list_is_still_probed(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = MockBackend(
        load_topology_file(
            two_gpu_file(tmp_path, "  - {gpu: 0, at: 1.0, kind: lost, recoverAfter: 1.0}\n")
        ),
        clock=clock,
    )
    started = clock.now
    changes = Changes()
    monitor = HealthMonitor(
        backend,
        lambda: backend.discover().gpus,  # a lost GPU drops out of discovery
        changes,
        probe_interval_s=1.0,
        healthy_after=2,
        ignored_xids=(),
        xid_recovery="probes",
        clock=clock,
    )
    monitor.handle_events([XidEvent(UUIDS[0], 94)])
    monitor.probe_once()
    clock.now = started + 1.5
    monitor.probe_once()
    assert monitor.unhealthy() == {UUIDS[0]: "critical XID 94"}
    assert monitor.gpu_health()[0] == GpuHealth(0, UUIDS[0], False, "critical XID 94")
    clock.now = started + 2.0
    monitor.probe_once()
    monitor.probe_once()
    assert changes.calls[-1] == {}


def test_threads_report_a_lost_gpu_and_an_xid_and_stop_promptly(tmp_path: Path) -> None:
    backend = MockBackend(
        load_topology_file(
            two_gpu_file(
                tmp_path,
                "  - {gpu: 0, at: 0.05, kind: lost, recoverAfter: 0.2}\n"
                "  - {gpu: 1, at: 0.1, kind: xid, xid: 79}\n",
            )
        )
    )
    gpus = backend.discover().gpus
    changes = WatchedChanges()
    wait_for = changes.wait_for
    monitor = HealthMonitor(
        backend,
        lambda: gpus,
        changes,
        probe_interval_s=0.02,
        healthy_after=2,
        ignored_xids=(),
        xid_recovery="never",
    )
    monitor.start()
    try:
        wait_for(lambda s: UUIDS[0] in s)
        wait_for(lambda s: s.get(UUIDS[1]) == "critical XID 79")
        wait_for(lambda s: s == {UUIDS[1]: "critical XID 79"})  # GPU 0 back, GPU 1 pinned
    finally:
        began = time.monotonic()
        monitor.stop()
        # Within one XID wait (a real NVML wait cannot be interrupted), and both threads gone.
        assert time.monotonic() - began < monitor_mod.XID_WAIT_S + 0.35
        assert not [t for t in threading.enumerate() if t.name.startswith("health-")]
        backend.close()


class _WaitFailsOnce(MockBackend):
    """A backend whose first XID wait fails, as NVML's does when a GPU falls off the bus."""

    failed = False

    def wait_xid_events(self, timeout_s: float) -> list[XidEvent]:
        if not self.failed:
            self.failed = True
            raise NvmlError("NVML event wait: GPU is lost")
        return super().wait_xid_events(timeout_s)


def test_a_failed_xid_wait_makes_every_gpu_unhealthy_until_its_probes_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # XIDs may have been missed: none can be vouched for but by its probes. It was one
    # log line, and nothing marked.
    backend = _WaitFailsOnce(load_topology_file(two_gpu_file(tmp_path, "  []\n")))
    gpus = backend.discover().gpus
    changes = WatchedChanges()
    monitor = HealthMonitor(
        backend,
        lambda: gpus,
        changes,
        probe_interval_s=0.05,
        healthy_after=2,
        ignored_xids=(),
        xid_recovery="never",
    )
    monitor.start()
    try:
        reason = "XID events could not be read (NVML event wait: GPU is lost)"
        changes.wait_for(lambda seen: seen == {UUIDS[0]: reason, UUIDS[1]: reason})
        changes.wait_for(lambda seen: seen == {})  # after it, back through its probes
    finally:
        monitor.stop()
        backend.close()
    assert "cannot read XID events (NVML event wait: GPU is lost)" in caplog.text
