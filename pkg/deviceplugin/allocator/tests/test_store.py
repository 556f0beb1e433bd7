from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pkg.deviceplugin.allocator.board import AllocationError, Policy, SeatBoard
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import R2, seed_layout
from pkg.deviceplugin.types import DeviceId


def test_missing_file_is_a_fresh_start(tmp_path: Path) -> None:
    assert StateStore(tmp_path).load() is None


@pytest.mark.parametrize(
    "content", ["{not json", json.dumps({"version": 99, "resources": {}}), "[1, 2]"]
)
def test_corrupt_file_is_set_aside_with_one_log_line_and_never_crashes(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path)
    store.path.write_text(content)
    with caplog.at_level(logging.ERROR):
        board = SeatBoard(seed_layout(), Policy(), store, release_grace_s=60)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "rebuilding from the kubelet's PodResources" in errors[0].getMessage()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == content
    assert board.allocate(R2, [["G01-s0"]])[0].envs["KYB_SEAT_GEN"] == "1"
    assert json.loads(store.path.read_text())["version"] == 1


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"resources": {}})
    store.save({"resources": {"x": {}}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert json.loads(store.path.read_text()) == {"resources": {"x": {}}, "version": 1}


def test_a_failed_durable_write_refuses_the_allocate_and_binds_nothing(tmp_path: Path) -> None:
    # A state "directory" that is a regular file: every save fails as a full or broken
    # disk would (root ignores permission bits, so chmod cannot stand in here).
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    board = SeatBoard(seed_layout(), Policy(), StateStore(not_a_dir), release_grace_s=60)
    with pytest.raises(AllocationError) as refused:
        board.allocate(R2, [["G01-s0"]])
    assert refused.value.code == "unavailable"
    view = board.seat_views(R2)[DeviceId("G01-s0")]
    assert (view.state, view.generation) == ("free", 0)
