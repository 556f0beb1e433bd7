"""The runtime's live changes, driven in-process against the mock backend."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkg.deviceplugin import logs, report
from pkg.deviceplugin.allocator.layout import LayoutError
from pkg.deviceplugin.allocator.tests.support import four_gpus_in_nvlink_pairs
from pkg.deviceplugin.config.source import ConfigSource
from pkg.deviceplugin.nvml import fixtures
from pkg.deviceplugin.nvml.backend import XidEvent
from pkg.deviceplugin.nvml.mock import MockBackend
from pkg.deviceplugin.nvml.topofile import load_topology_file
from pkg.deviceplugin.runtime import Runtime
from pkg.deviceplugin.topology.merge import merge_topology
from pkg.deviceplugin.types import SetAsideGpu, Topology

PROFILES = "profiles:\n  - resource: kyb.ai/gpu-1x-seat\n    seatsPerGroup: 2\n"


@pytest.fixture
def root() -> Iterator[Path]:
    # Unix socket paths must stay short; pytest's tmp_path can be too long.
    path = Path(tempfile.mkdtemp(prefix="kyb-rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def base(root: Path) -> str:
    return f"{PROFILES}stateDir: {root / 'state'}\n"


@pytest.fixture
def runtime(root: Path) -> Iterator[Runtime]:
    config = root / "config.yaml"
    config.write_text(base(root))
    overrides = {"kubeletDir": str(root / "dp"), "podResourcesSocket": str(root / "pr.sock")}
    source = ConfigSource(config, overrides)
    rt = Runtime(source.load(), MockBackend.from_name_or_path("pcie-2numa-4"), source=source)
    yield rt
    rt.stop()


@pytest.fixture
def restored_logging() -> Iterator[None]:
    handlers, level = list(logging.getLogger().handlers), logging.getLogger().level
    yield
    logging.getLogger().handlers[:] = handlers
    logging.getLogger().setLevel(level)


def test_a_reload_names_the_keys_that_wait_for_a_restart_as_the_file_spells_them(
    runtime: Runtime, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = runtime.config
    (root / "config.yaml").write_text(
        f"{PROFILES}stateDir: {root / 'elsewhere'}\nmetricsAddress: 127.0.0.1:9400\n"
    )
    assert runtime.reload()
    assert (runtime.config.state_dir, runtime.config.metrics_address) == (before.state_dir, None)
    assert [r.getMessage() for r in caplog.records if "after a restart" in r.getMessage()] == [
        "config key stateDir changed; it takes effect after a restart",
        "config key metricsAddress changed; it takes effect after a restart",
    ]


def test_ignored_xids_that_drop_a_default_are_warned_about_at_start_and_reload(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Setting ignoredXids: [94] once silently un-ignored the application XIDs 13, 31, ...
    config = root / "config.yaml"
    config.write_text(base(root) + "ignoredXids: [94, 13]\n")
    overrides = {"kubeletDir": str(root / "dp"), "podResourcesSocket": str(root / "pr.sock")}
    source = ConfigSource(config, overrides)
    with caplog.at_level(logging.WARNING):
        rt = Runtime(source.load(), MockBackend.from_name_or_path("pcie-2numa-4"), source=source)
    try:
        warned = [r.getMessage() for r in caplog.records if "ignoredXids" in r.getMessage()]
        assert warned == [
            "ignoredXids replaces the default list and leaves out XIDs 31, 43, 45, 68, 109, "
            "which now mark a GPU unhealthy; to add XIDs to the defaults, set "
            "extraIgnoredXids instead"
        ]
        gpu0, gpu1 = (gpu.uuid for gpu in rt.topology.gpus[:2])
        rt.health.handle_events([XidEvent(gpu0, 94), XidEvent(gpu1, 31)])
        assert set(rt.health.unhealthy()) == {gpu1}  # 31 is no longer ignored
        caplog.clear()
        config.write_text(base(root) + "extraIgnoredXids: [94]\n")
        assert rt.reload()
        assert not [r for r in caplog.records if "ignoredXids" in r.getMessage()]
        rt.health.handle_events([XidEvent(gpu0, 94), XidEvent(gpu0, 13)])
        assert set(rt.health.unhealthy()) == {gpu1}  # the defaults and 94: all ignored
    finally:
        rt.stop()


def test_a_reload_switches_the_log_format_and_a_rejected_reload_keeps_it(
    runtime: Runtime, root: Path, restored_logging: None
) -> None:
    logs.setup("text")
    handler = logging.getLogger().handlers[0]
    (root / "config.yaml").write_text(base(root) + "logFormat: json\n")
    assert runtime.reload()
    assert isinstance(handler.formatter, logs.JsonFormatter)
    (root / "config.yaml").write_text("profiles: [")
    assert not runtime.reload()
    assert isinstance(handler.formatter, logs.JsonFormatter)
    assert runtime.config.log_format == "json"


def test_a_gpu_that_appeared_while_another_was_lost_learns_their_link_when_it_returns() -> None:
    full = four_gpus_in_nvlink_pairs()

    def seen(*indices: int) -> Topology:
        return Topology(
            tuple(g for g in full.gpus if g.index in indices),
            {p: link for p, link in full.links.items() if set(p) <= set(indices)},
        )

    # GPU 3 appears while GPU 2 is off the bus: the link 2-3 is unknown (counts as SYS).
    start = seen(0, 1, 2)
    merged, added = merge_topology(start, seen(0, 1, 3))
    assert added == [3] and (2, 3) not in merged.links
    assert merged.link(1, 3) == full.link(1, 3)
    # GPU 2 answers again: nothing appears, the missing link is learned, the rest kept.
    again, added = merge_topology(merged, full)
    assert added == [] and again.link(2, 3) == full.link(2, 3)
    assert dict(again.links) == dict(full.links)
    # Nothing new to learn: the same object back, so a refresh does nothing.
    assert merge_topology(again, full)[0] is again


GROUPED = (
    "profiles:\n  - resource: kyb.ai/gpu-2x-seat\n    seatsPerGroup: 2\n"
    "groups:\n  - name: G01\n    gpus: [0, 1]\n  - name: G23\n    gpus: [2, 3]\n"
)


def test_a_restart_while_a_gpu_of_an_explicit_group_is_off_the_bus_keeps_the_group(
    root: Path,
) -> None:
    config = root / "config.yaml"
    config.write_text(f"{GROUPED}stateDir: {root / 'state'}\n")
    overrides = {"kubeletDir": str(root / "dp"), "podResourcesSocket": str(root / "pr.sock")}
    source = ConfigSource(config, overrides)
    node = load_topology_file(fixtures.resolve("pcie-2numa-4"))
    Runtime(source.load(), MockBackend(node), source=source).stop()  # caches the topology
    lost = root / "lost.json"
    lost.write_text(json.dumps({**node.to_data(), "faults": [{"gpu": 3, "at": 0, "kind": "lost"}]}))

    # Before, the restart stopped with "unknown GPU index 3" (exit 2): every profile down.
    rt = Runtime(source.load(), MockBackend(load_topology_file(lost)), source=source)
    try:
        rt.health.probe_once()
        g23 = rt.board.status()["resources"]["kyb.ai/gpu-2x-seat"]["groups"]["G23"]
        assert g23["gpus"] == [2, 3] and g23["health"] == "Unhealthy"
        assert (
            rt.board.status()["resources"]["kyb.ai/gpu-2x-seat"]["groups"]["G01"]["health"]
            == "Healthy"
        )
    finally:
        rt.stop()

    # A GPU the cache does not know either is the config's error, naming file and key.
    (root / "state" / "topology.json").unlink()
    with pytest.raises(LayoutError) as err:
        Runtime(source.load(), MockBackend(load_topology_file(lost)), source=source)
    assert err.value.located(source.origin) == [
        f"{config}: groups[1].gpus: unknown GPU index 3 in group G23 "
        "(this node has GPU indices 0, 1, 2)"
    ]


def test_a_reload_naming_an_unknown_gpu_is_rejected_with_the_file_and_key(
    runtime: Runtime, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "config.yaml").write_text(base(root) + "groups:\n  - name: G07\n    gpus: [0, 7]\n")
    assert not runtime.reload()
    rejected = [r.getMessage() for r in caplog.records if "config rejected" in r.getMessage()]
    assert rejected == [
        f"config rejected: {root / 'config.yaml'}: groups[0].gpus: unknown GPU index 7 "
        "in group G07 (this node has GPU indices 0, 1, 2, 3)"
    ]


def test_a_topology_refresh_survives_any_exception_and_keeps_the_topology(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Only NvmlError was caught: anything else a driver's answer broke ended the thread.
    before = runtime.topology

    def broken() -> Topology:
        raise ValueError("unparseable bus ID 'x'")

    monkeypatch.setattr(runtime.backend, "discover", broken)
    runtime.refresh_topology()
    assert runtime.topology is before
    assert "topology refresh failed (unparseable bus ID 'x')" in caplog.text


class _OneMigGpu(MockBackend):
    """pcie-2numa-4 whose GPU 3 discovery sets aside (MIG enabled), as RealBackend does."""

    def discover(self) -> Topology:
        topo = super().discover()
        gpu = topo.gpu(3)
        return Topology(
            tuple(g for g in topo.gpus if g.index != 3),
            {pair: link for pair, link in topo.links.items() if 3 not in pair},
            (SetAsideGpu(3, gpu.uuid, "MIG is enabled: ..."),),
        )


def test_a_set_aside_gpu_shows_in_status_the_state_file_and_plan(root: Path) -> None:
    config = root / "config.yaml"
    config.write_text(base(root))
    source = ConfigSource(config, {"kubeletDir": str(root / "dp")})
    backend = _OneMigGpu.from_name_or_path("pcie-2numa-4")
    rt = Runtime(source.load(), backend, source=source)
    try:
        shown = [
            {"index": 3, "uuid": backend.discover().set_aside[0].uuid, "why": "MIG is enabled: ..."}
        ]
        assert rt.board.status()["setAsideGpus"] == shown
        saved = json.loads((root / "state" / "state.json").read_text())
        assert report.status_view(saved)["setAsideGpus"] == shown
        assert not any(3 in g.indices for _, g in rt.board.layout.groups())
        out = io.StringIO()
        report.print_seat_map(report.status_view(saved), out)
        assert f"GPU 3 ({shown[0]['uuid']}) not served: MIG is enabled: ..." in out.getvalue()
        assert report.plan_document(rt.config, backend.discover())["setAsideGpus"] == shown
    finally:
        rt.stop()
