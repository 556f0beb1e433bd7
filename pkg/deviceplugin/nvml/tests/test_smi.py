"""The ``nvidia-smi topo -m`` fallback: real outputs parse exactly, garbage is refused."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from pkg.deviceplugin.nvml import smi
from pkg.deviceplugin.types import Link

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def matrix(text: str) -> dict[tuple[int, int], Link]:
    """The expected links, written as the GPU block of the matrix (upper triangle read)."""
    rows = [line.split() for line in text.strip().splitlines()]
    return {
        (i, j): Link.parse(rows[i][j]) for i in range(len(rows)) for j in range(i + 1, len(rows))
    }


def uniform(count: int, word: str) -> dict[tuple[int, int], Link]:
    return {(i, j): Link.parse(word) for i in range(count) for j in range(i + 1, count)}


DGX1_V100 = matrix(
    """
    X   NV1 NV1 NV2 NV2 SYS SYS SYS
    NV1 X   NV2 NV1 SYS NV2 SYS SYS
    NV1 NV2 X   NV2 SYS SYS NV1 SYS
    NV2 NV1 NV2 X   SYS SYS SYS NV1
    NV2 SYS SYS SYS X   NV1 NV1 NV2
    SYS NV2 SYS SYS NV1 X   NV2 NV1
    SYS SYS NV1 SYS NV1 NV2 X   NV2
    SYS SYS SYS NV1 NV2 NV1 NV2 X
    """
)

PCIE_8 = matrix(
    """
    X    NODE PIX  NODE SYS  SYS  SYS  SYS
    NODE X    NODE PIX  SYS  SYS  SYS  SYS
    PIX  NODE X    NODE SYS  SYS  SYS  SYS
    NODE PIX  NODE X    SYS  SYS  SYS  SYS
    SYS  SYS  SYS  SYS  X    PXB  PIX  PXB
    SYS  SYS  SYS  SYS  PXB  X    PXB  PIX
    SYS  SYS  SYS  SYS  PIX  PXB  X    PXB
    SYS  SYS  SYS  SYS  PXB  PIX  PXB  X
    """
)

WORKSTATION_4 = matrix(
    """
    X   NV4 PHB PHB
    NV4 X   PHB PHB
    PHB PHB X   NV4
    PHB PHB NV4 X
    """
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dgx1-v100.txt", DGX1_V100),
        ("dgx-a100.txt", uniform(8, "NV12")),
        ("dgx-h100.txt", uniform(8, "NV18")),
        ("pcie-8.txt", PCIE_8),
        ("workstation-4.txt", WORKSTATION_4),
    ],
)
def test_real_outputs_parse_to_their_full_gpu_matrix(
    name: str, expected: dict[tuple[int, int], Link]
) -> None:
    assert smi.parse_topo_matrix(fixture(name)) == expected


def test_escape_codes_and_crlf_around_the_header_are_ignored() -> None:
    header, rest = fixture("dgx1-v100.txt").split("\n", 1)
    decorated = f"\x1b[4m\x1b[1m{header}\x1b[0m\n{rest}".replace("\n", "\r\n")
    assert smi.parse_topo_matrix(decorated) == DGX1_V100


def test_old_drivers_soc_word_means_sys() -> None:
    text = (
        "\tGPU0\tGPU1\tGPU2\tGPU3\tmlx4_0\tCPU Affinity\n"
        "GPU0\t X \tPIX\tSOC\tSOC\tPHB\t0-11\n"
        "GPU1\tPIX\t X \tSOC\tSOC\tPHB\t0-11\n"
        "GPU2\tSOC\tSOC\t X \tPIX\tSOC\t12-23\n"
        "GPU3\tSOC\tSOC\tPIX\t X \tSOC\t12-23\n"
        "mlx4_0\tPHB\tPHB\tSOC\tSOC\t X \t\n"
        "\n"
        "Legend:\n"
        "\n"
        "  X   = Self\n"
        "  SOC = Path traverses a socket-level link (e.g. QPI)\n"
    )
    assert smi.parse_topo_matrix(text) == matrix(
        """
        X   PIX SYS SYS
        PIX X   SYS SYS
        SYS SYS X   PIX
        SYS SYS PIX X
        """
    )


def test_space_aligned_copy_of_the_output_parses_too() -> None:
    text = """
            GPU0    GPU1    GPU2    GPU3    NIC0    CPU Affinity    NUMA Affinity
    GPU0     X      NV4     SYS     SYS     NODE    0-15            0
    GPU1    NV4      X      SYS     SYS     NODE    0-15            0
    GPU2    SYS     SYS      X      NV4     SYS     16-31           1
    GPU3    SYS     SYS     NV4      X      SYS     16-31           1
    NIC0    NODE    NODE    SYS     SYS      X

    Legend:
    """
    assert smi.parse_topo_matrix(text) == matrix(
        """
        X   NV4 SYS SYS
        NV4 X   SYS SYS
        SYS SYS X   NV4
        SYS SYS NV4 X
        """
    )


def test_single_gpu_has_no_pairs() -> None:
    text = (
        "\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t0-15\t0\t\tN/A\n\nLegend:\n"
    )
    assert smi.parse_topo_matrix(text) == {}


def _replace_row(text: str, label: str, row: str) -> str:
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(label + "\t"))
    lines[at] = row
    return "\n".join(lines)


WORKSTATION = fixture("workstation-4.txt")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no GPU header row"),
        (
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
            "no GPU header row",
        ),
        ("GPU0\t X \tNV4\nGPU1\tNV4\t X \n", "no GPU header row"),
        (
            _replace_row(WORKSTATION, "GPU2", "GPU2\tPHB\tPHB\t X \t0-31\t0\t\tN/A"),
            "row GPU2, column GPU3: unknown link word '0-31'",
        ),
        (
            _replace_row(WORKSTATION, "GPU2", "GPU2\tPHB\tPHB\t X \tNV4\tPHB\t0-31"),
            "row GPU2 does not line up with the header",
        ),
        (
            _replace_row(WORKSTATION, "GPU3", "GPU3\tPHB\tPHB"),
            "row GPU3 does not line up with the header",
        ),
        (
            WORKSTATION.replace("GPU3\tPHB\tPHB\tNV4\t X \t0-31\t0\t\tN/A\n", ""),
            "not square: GPU columns GPU0 GPU1 GPU2 GPU3 but GPU rows GPU0 GPU1 GPU2",
        ),
        (
            _replace_row(WORKSTATION, "GPU3", "GPU2\tPHB\tPHB\t X \tNV4\t0-31\t0\t\tN/A"),
            "lists row GPU2 twice",
        ),
        (
            _replace_row(WORKSTATION, "GPU1", "GPU1\tNV4\t X \tPHB\tNV9\t0-31\t0\t\tN/A"),
            "not symmetric: row GPU1, column GPU3 is NV9 but row GPU3, column GPU1 is PHB",
        ),
        (
            _replace_row(WORKSTATION, "GPU1", "GPU1\tNV4\t X \tPHB\tQPI\t0-31\t0\t\tN/A"),
            "row GPU1, column GPU3: unknown link word 'QPI'",
        ),
        (
            _replace_row(WORKSTATION, "GPU1", "GPU1\tNV4\tPHB\tPHB\tPHB\t0-31\t0\t\tN/A"),
            "row GPU1, column GPU1: expected X, got PHB",
        ),
        (
            _replace_row(WORKSTATION, "GPU1", "GPU1\t X \t X \tPHB\tPHB\t0-31\t0\t\tN/A"),
            "row GPU1, column GPU0: expected a link, not X, got X",
        ),
        (
            WORKSTATION.replace("\tGPU3\tCPU", "\tGPU2\tCPU", 1),
            "header names GPU2 more than once",
        ),
        (
            "\tGPU0\tNIC0\tGPU1\tCPU Affinity\n"
            "GPU0\t X \tPIX\tPHB\t0-7\n"
            "NIC0\tPIX\t X \tPHB\t\n"
            "GPU1\tPHB\tPHB\t X \t0-7\n",
            "lists a GPU after the NICs",
        ),
    ],
    ids=[
        "empty",
        "driver-error-text",
        "rows-without-header",
        "short-row",
        "long-row",
        "truncated-row",
        "missing-row",
        "repeated-row",
        "asymmetric",
        "unknown-word",
        "no-x-on-diagonal",
        "x-off-diagonal",
        "repeated-column",
        "gpu-after-nic",
    ],
)
def test_garbage_is_refused_with_a_readable_line(text: str, message: str) -> None:
    with pytest.raises(smi.SmiError, match=message) as caught:
        smi.parse_topo_matrix(text)
    assert "\n" not in str(caught.value)


def test_run_topo_matrix_runs_nvidia_smi_topo_m_through_the_runner() -> None:
    calls: list[Sequence[str]] = []

    def runner(argv: Sequence[str]) -> str:
        calls.append(argv)
        return fixture("dgx-h100.txt")

    assert smi.run_topo_matrix(runner) == uniform(8, "NV18")
    assert [list(argv) for argv in calls] == [["nvidia-smi", "topo", "-m"]]


def test_runner_errors_pass_through() -> None:
    def runner(argv: Sequence[str]) -> str:
        raise smi.SmiError("nvidia-smi exploded")

    with pytest.raises(smi.SmiError, match="exploded"):
        smi.run_topo_matrix(runner)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory searched first on PATH, for a stand-in ``nvidia-smi``."""
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    return tmp_path


def _script(directory: Path, body: str) -> None:
    path = directory / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(os.name != "posix", reason="needs a POSIX shell")
def test_default_runner_reads_the_real_command_output(fake_bin: Path) -> None:
    _script(fake_bin, f"exec cat '{FIXTURES / 'pcie-8.txt'}'")
    assert smi.run_topo_matrix() == PCIE_8


def test_default_runner_reports_a_missing_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(smi.SmiError, match=r"^nvidia-smi not found"):
        smi.run_topo_matrix()


@pytest.mark.skipif(os.name != "posix", reason="needs a POSIX shell")
def test_default_runner_reports_a_failing_command_with_its_message(fake_bin: Path) -> None:
    _script(
        fake_bin,
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\n'
        "exit 9",
    )
    with pytest.raises(
        smi.SmiError,
        match=r"^nvidia-smi topo -m exited with status 9: NVIDIA-SMI has failed because",
    ):
        smi.run_topo_matrix()


@pytest.mark.skipif(os.name != "posix", reason="needs a POSIX shell")
def test_default_runner_gives_up_after_its_timeout(fake_bin: Path) -> None:
    _script(fake_bin, "exec sleep 5")
    with pytest.raises(smi.SmiError, match=r"did not finish within 0\.2s"):
        smi.run_command(smi.COMMAND, timeout_s=0.2)
