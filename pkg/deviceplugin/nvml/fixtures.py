"""The built-in mock topologies: data files under ``fixtures/``, found by name.

``--nvml-mock`` (SPEC 9) takes either one of these names or a path to a topology file.
"""

from __future__ import annotations

from pathlib import Path

from pkg.deviceplugin.nvml.backend import NvmlError

_DIR = Path(__file__).resolve().parent / "fixtures"

FIXTURES: tuple[str, ...] = (
    "dgx-a100",
    "dgx-h100",
    "dgx1-v100",
    "nvswitch-16",
    "nvlink-pairs-4",
    "pcie-2numa-4",
    "pcie-switch-pairs-8",
    "single-gpu",
    "no-gpu",
    "flaky-4",
)
"""Every built-in fixture name; the tests pin that each has its file and vice versa."""


def fixture_path(name: str) -> Path:
    """The data file of a built-in fixture. Raises NvmlError for an unknown name."""
    if name not in FIXTURES:
        raise NvmlError(f"unknown NVML mock fixture {name!r} (built in: {', '.join(FIXTURES)})")
    return _DIR / f"{name}.yaml"


def resolve(name_or_path: str | Path) -> Path:
    """A built-in fixture name or a topology file path -> the file to load.

    A name wins over a same-named file in the working directory only when it has no
    path separator or suffix, so ``./dgx-a100`` or ``dgx-a100.yaml`` still mean files.
    """
    text = str(name_or_path)
    if text in FIXTURES:
        return fixture_path(text)
    path = Path(text)
    if path.is_file():
        return path
    raise NvmlError(
        f"NVML mock {text!r} is neither a built-in fixture ({', '.join(FIXTURES)}) "
        "nor an existing topology file"
    )
