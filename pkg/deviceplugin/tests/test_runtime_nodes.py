"""A node's override in the running plugin (issue 15 point 1): applied at start and by a
reload like any config change, named in the status and the log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkg.deviceplugin import report
from pkg.deviceplugin.config.source import ConfigSource
from pkg.deviceplugin.nvml.mock import MockBackend
from pkg.deviceplugin.runtime import Runtime
from pkg.deviceplugin.tests.test_runtime import base, root
from pkg.deviceplugin.types import ResourceName

__all__ = ["root"]

R1 = ResourceName("kyb.ai/gpu-1x-seat")


def start(root: Path, node: str | None, text: str) -> Runtime:
    (root / "config.yaml").write_text(base(root) + text)
    overrides = {"kubeletDir": str(root / "dp"), "podResourcesSocket": str(root / "pr.sock")}
    source = ConfigSource(root / "config.yaml", overrides, node)
    return Runtime(source.load(), MockBackend.from_name_or_path("pcie-2numa-4"), source=source)


@pytest.fixture
def on_gpu_a(root: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Runtime]:
    with caplog.at_level(logging.INFO):
        rt = start(root, "gpu-a", "nodes:\n  gpu-a: {drain: [G1]}\n  gpu-b: {drain: [G2]}\n")
    yield rt
    rt.stop()


def drained(rt: Runtime) -> set[str]:
    groups = rt.board.status()["resources"][R1]["groups"]
    return {name for name, group in groups.items() if group["drained"]}


def test_the_override_of_this_node_applies_and_the_status_and_log_name_it(
    on_gpu_a: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    assert drained(on_gpu_a) == {"G1"}
    status = on_gpu_a.board.status()
    assert (status.get("node"), status.get("override")) == ("gpu-a", {"drain": ["G1"]})
    said = [r.getMessage() for r in caplog.get_records("setup")]
    assert 'node gpu-a: override nodes.gpu-a in force: {"drain":["G1"]}' in said


def test_a_reload_applies_a_changed_override_and_says_so_once(
    on_gpu_a: Runtime, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    (root / "config.yaml").write_text(base(root) + "nodes:\n  gpu-a: {drainGpus: [3]}\n")
    with caplog.at_level(logging.INFO):
        assert on_gpu_a.reload()
    assert drained(on_gpu_a) == {"G3"}
    assert on_gpu_a.board.status().get("override") == {"drainGpus": [3]}
    assert 'node gpu-a: override nodes.gpu-a in force: {"drainGpus":[3]}' in caplog.messages
    caplog.clear()
    (root / "config.yaml").write_text(base(root) + "nodes:\n  gpu-b: {drain: [G0]}\n")
    with caplog.at_level(logging.INFO):
        assert on_gpu_a.reload()
    assert drained(on_gpu_a) == set()
    assert "override" not in on_gpu_a.board.status()
    assert "node gpu-a: no override for it in the config (nodes)" in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert on_gpu_a.reload()  # the same override (none): not said again
    assert not [m for m in caplog.messages if m.startswith("node gpu-a")]


def test_drain_gpus_naming_no_gpu_of_this_node_is_a_warning_not_an_error(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        rt = start(root, None, "drainGpus: [9, GPU-elsewhere, 2]\n")
    try:
        assert drained(rt) == {"G2"}
        assert [m for m in caplog.messages if m.startswith("drainGpus")] == [
            "drainGpus[0]: no GPU 9 on this node (GPU indices 0, 1, 2, 3); "
            "nothing to drain for it here",
            "drainGpus[1]: no GPU 'GPU-elsewhere' on this node (GPU indices 0, 1, 2, 3); "
            "nothing to drain for it here",
        ]
        assert "node" not in rt.board.status()
    finally:
        rt.stop()


def test_a_node_override_of_seat_counts_changes_this_nodes_profile(root: Path) -> None:
    rt = start(root, "gpu-a", f"nodes:\n  gpu-a: {{seatsPerGroup: {{{R1}: 5}}}}\n")
    try:
        assert len(rt.board.devices(R1)) == 4 * 5
    finally:
        rt.stop()


def test_the_status_command_shows_the_node_its_override_and_why_groups_drain(
    on_gpu_a: Runtime, root: Path
) -> None:
    on_gpu_a.board.flush()
    shown = report.status_view(json.loads((root / "state" / "state.json").read_text()))
    assert (shown.get("node"), shown.get("override")) == ("gpu-a", {"drain": ["G1"]})
    out = io.StringIO()
    report.print_seat_map(shown, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == 'node gpu-a: override {"drain":["G1"]}'
    assert any(line.endswith("Healthy draining (group G1 is draining)") for line in lines)
