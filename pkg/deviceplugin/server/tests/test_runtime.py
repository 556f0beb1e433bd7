"""The runtime's live changes, driven in-process against the mock backend."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkg.deviceplugin import logs
from pkg.deviceplugin.allocator.tests.support import four_gpus_in_nvlink_pairs
from pkg.deviceplugin.nvml.mock import MockBackend
from pkg.deviceplugin.server.runtime import ConfigSource, Runtime, merge_topology
from pkg.deviceplugin.types import Topology

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
