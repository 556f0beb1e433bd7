"""The prepared real-GPU check (conformance/gpu/check.py) runs end to end: on the test
suite's mock NVML library here, so that the day a GPU is at hand it works first time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pkg.deviceplugin.nvml import fixtures, mocklib
from pkg.deviceplugin.nvml.topofile import load_topology_file

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "conformance" / "gpu" / "check.py"

# Brings its own topology (SPEC 8: tox runs it once, not per topology).
pytestmark = [
    pytest.mark.own_topology,
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) here"),
]


def run_check(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(CHECK), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


def test_the_gpu_check_runs_every_step_on_the_mock_library(tmp_path: Path) -> None:
    lib = mocklib.build(tmp_path)
    data = mocklib.write_data(
        load_topology_file(fixtures.fixture_path("nvlink-pairs-4")), tmp_path / "data.txt"
    )
    report = run_check(
        tmp_path,
        "--seconds",
        "2",
        "--nvml-library",
        str(lib),
        env={mocklib.ENV_VAR: str(data)},
    )
    assert report.startswith("rc=0\n"), report
    for step in ("== driver", "== pytest -m gpu", "== plan --output json", "== serve for 2 s"):
        assert step in report, report
    assert "kyb.ai/gpu-2x-seat: CUDA_VISIBLE_DEVICES=0,1, KYB_GPU_INDICES=" in report, report
    assert "== result: all passed" in report


def test_the_gpu_check_says_when_there_is_no_driver(tmp_path: Path) -> None:
    report = run_check(tmp_path, "--nvml-library", str(tmp_path / "missing.so"))
    assert report.startswith("rc=2\n"), report
    assert "no usable NVIDIA driver here" in report
