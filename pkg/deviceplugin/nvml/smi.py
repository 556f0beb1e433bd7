"""The ``nvidia-smi topo -m`` fallback, for when NVML cannot tell how GPUs are linked.

``nvidia-smi topo -m`` prints a matrix: a header row of column names (GPUs first, then
NICs, then columns such as ``CPU Affinity`` whose names hold spaces), one row per GPU and
per NIC, a blank line and legends. Only the GPU-by-GPU cells are read. Anything that does
not look like that matrix is refused with :class:`SmiError`, never half-read.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence

from pkg.deviceplugin.types import Link, LinkKind

COMMAND: tuple[str, ...] = ("nvidia-smi", "topo", "-m")
TIMEOUT_S = 10.0

Runner = Callable[[Sequence[str]], str]
"""Runs a command and returns its standard output; raises :class:`SmiError` on failure."""

LinkMatrix = dict[tuple[int, int], Link]

# Terminal control sequences: some drivers underline or bold the header row.
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_GPU_NAME = re.compile(r"^GPU(?P<index>[0-9]+)$")
_COMMAND_TEXT = " ".join(COMMAND)


class SmiError(Exception):
    """``nvidia-smi`` could not be run or its output could not be trusted; one line."""


def run_topo_matrix(runner: Runner | None = None) -> LinkMatrix:
    """Run ``nvidia-smi topo -m`` and return the link of every GPU pair ``(i, j)``, ``i < j``."""
    output = (runner or run_command)(COMMAND)
    return parse_topo_matrix(output)


def run_command(argv: Sequence[str], timeout_s: float = TIMEOUT_S) -> str:
    """The default runner: a subprocess with a timeout, failures as one-line ``SmiError``."""
    command = " ".join(argv)
    try:
        completed = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError:
        raise SmiError(f"{argv[0]} not found; is the NVIDIA driver installed?") from None
    except subprocess.TimeoutExpired:
        raise SmiError(f"{command} did not finish within {timeout_s:g}s") from None
    except OSError as error:
        raise SmiError(f"cannot run {command}: {error.strerror or error}") from None
    if completed.returncode != 0:
        # nvidia-smi reports most failures on stdout.
        detail = _first_line(completed.stderr) or _first_line(completed.stdout) or "no output"
        raise SmiError(f"{command} exited with status {completed.returncode}: {detail}")
    return completed.stdout


def parse_topo_matrix(text: str) -> LinkMatrix:
    """The GPU-to-GPU links of ``nvidia-smi topo -m`` output, keyed ``(i, j)`` with ``i < j``."""
    lines = _ESCAPE.sub("", text).replace("\r", "").split("\n")
    header_at = _find_header(lines)
    if header_at is None:
        raise SmiError(f"no GPU header row (GPU0 GPU1 ...) in the output of {_COMMAND_TEXT}")
    columns = _header_columns(lines[header_at])
    devices = _device_columns(columns)
    gpus = _gpu_columns(devices)
    rows = _gpu_rows(lines[header_at + 1 :], devices)
    if sorted(rows) != sorted(gpus):
        raise SmiError(
            f"{_COMMAND_TEXT} matrix is not square: GPU columns {_names(gpus)} "
            f"but GPU rows {_names(rows)}"
        )
    return _links(gpus, rows)


def _find_header(lines: Sequence[str]) -> int | None:
    for at, line in enumerate(lines):
        cells = [cell.strip() for cell in _split_row(line)]
        while cells and not cells[0]:
            cells.pop(0)
        if not cells or _GPU_NAME.match(cells[0]) is None:
            continue
        # A GPU row starts the same way, but its next cell is a link word.
        if len(cells) == 1 or _link_or_none(cells[1]) is None:
            return at
    return None


def _header_columns(line: str) -> list[str]:
    if "\t" in line:
        columns = [cell.strip() for cell in line.split("\t")]
    else:
        # Pasted or re-aligned output: names such as "CPU Affinity" hold single spaces.
        columns = re.split(r" {2,}", line.strip())
    while columns and not columns[0]:
        columns.pop(0)
    return columns


def _device_columns(columns: Sequence[str]) -> list[str]:
    """The GPU and NIC columns: every name before the first one holding a space."""
    devices: list[str] = []
    for name in columns:
        if not name or any(character.isspace() for character in name):
            break
        devices.append(name)
    if len(set(devices)) != len(devices):
        repeated = sorted({name for name in devices if devices.count(name) > 1})
        raise SmiError(f"{_COMMAND_TEXT} header names {', '.join(repeated)} more than once")
    return devices


def _gpu_columns(devices: Sequence[str]) -> list[int]:
    gpus: list[int] = []
    for name in devices:
        match = _GPU_NAME.match(name)
        if match is None:
            break
        gpus.append(int(match["index"]))
    if any(_GPU_NAME.match(name) for name in devices[len(gpus) :]):
        raise SmiError(f"{_COMMAND_TEXT} header lists a GPU after the NICs: {' '.join(devices)}")
    return gpus


def _gpu_rows(lines: Sequence[str], devices: Sequence[str]) -> dict[int, list[Link]]:
    """Every GPU row of the matrix (up to the blank line), parsed over all device columns."""
    rows: dict[int, list[Link]] = {}
    for line in lines:
        if not line.strip() or line.strip().startswith("Legend"):
            break
        cells = [cell.strip() for cell in _split_row(line)]
        match = _GPU_NAME.match(cells[0])
        if match is None:
            continue  # a NIC row: nothing of it is needed
        label, index = cells[0], int(match["index"])
        if index in rows:
            raise SmiError(f"{_COMMAND_TEXT} lists row {label} twice")
        words = cells[1:]
        if len(words) < len(devices) or (
            len(words) > len(devices) and _link_or_none(words[len(devices)]) is not None
        ):
            raise SmiError(
                f"{_COMMAND_TEXT} row {label} does not line up with the header: "
                f"{len(devices)} device columns expected"
            )
        links: list[Link] = []
        for column, word in zip(devices, words, strict=False):
            link = _link_or_none(word)
            if link is None:
                raise SmiError(
                    f"{_COMMAND_TEXT} row {label}, column {column}: unknown link word {word!r}"
                )
            links.append(link)
        rows[index] = links
    return rows


def _links(gpus: Sequence[int], rows: dict[int, list[Link]]) -> LinkMatrix:
    for row_index in gpus:
        for column_index, link in zip(gpus, rows[row_index], strict=False):
            if (row_index == column_index) != (link.kind is LinkKind.SELF):
                expected = "X" if row_index == column_index else "a link, not X"
                raise SmiError(
                    f"{_COMMAND_TEXT} row GPU{row_index}, column GPU{column_index}: "
                    f"expected {expected}, got {link.word}"
                )
    result: LinkMatrix = {}
    for i, j in itertools.combinations(range(len(gpus)), 2):
        link, mirror = rows[gpus[i]][j], rows[gpus[j]][i]
        if link != mirror:
            raise SmiError(
                f"{_COMMAND_TEXT} matrix is not symmetric: row GPU{gpus[i]}, column GPU{gpus[j]} "
                f"is {link.word} but row GPU{gpus[j]}, column GPU{gpus[i]} is {mirror.word}"
            )
        result[(min(gpus[i], gpus[j]), max(gpus[i], gpus[j]))] = link
    return result


def _split_row(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def _link_or_none(word: str) -> Link | None:
    try:
        return Link.parse(word)
    except ValueError:
        return None


def _names(indices: Iterable[int]) -> str:
    return " ".join(f"GPU{index}" for index in sorted(indices)) or "none"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""
