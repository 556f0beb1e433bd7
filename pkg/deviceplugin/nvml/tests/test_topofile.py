"""The mock topology file: what loads, and the one line per problem for what does not."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from pkg.deviceplugin.nvml.backend import NvmlError
from pkg.deviceplugin.nvml.topofile import (
    TopologyFile,
    TopologyFileError,
    load_topology_file,
    normalize_pci_bus_id,
)
from pkg.deviceplugin.types import Link, LinkKind

GOOD = """\
gpus:
  - {index: 0, uuid: GPU-00000000-0000-0000-0000-000000000000, name: NVIDIA A100-SXM4-80GB,
     memoryMiB: 81920, pciBusId: "00000000:07:00.0", minor: 3, numaNode: 0}
  - {index: 1, uuid: GPU-11111111-1111-1111-1111-111111111111, name: NVIDIA A100-SXM4-80GB,
     memoryMiB: 81920, pciBusId: "0000:0f:00.0", minor: 1}
  - {index: 2, uuid: GPU-22222222-2222-2222-2222-222222222222, name: NVIDIA A100-SXM4-80GB,
     memoryMiB: 81920, pciBusId: "00000000:47:00.0", minor: 2, numaNode: null}
links:
  - [X, NV12, SYS]
  - [NV12, X, SOC]
  - [SYS, SYS, X]
faults:
  - {gpu: 2, at: 3.0, kind: lost, recoverAfter: 5.0}
  - {gpu: 1, at: 4, kind: xid, xid: 79}
"""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(TopologyFileError) as info:
        load_topology_file(write(tmp_path, text))
    prefix = f"{tmp_path / 'x.yaml'}: "
    assert all(line.startswith(prefix) for line in info.value.problems)
    assert str(info.value) == "\n".join(info.value.problems)
    return [line.removeprefix(prefix) for line in info.value.problems]


def edited(**changes: object) -> str:
    data = yaml.safe_load(GOOD)
    for path, value in changes.items():
        target = data
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        last = keys[-1]
        if value is ...:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return yaml.safe_dump(data)


def test_a_valid_file_yields_its_gpus_links_and_faults(tmp_path: Path) -> None:
    tf = load_topology_file(write(tmp_path, GOOD))
    topo = tf.topology()
    assert topo.indices == (0, 1, 2)
    first = topo.gpu(0)
    assert (first.name, first.memory_mib, first.minor, first.numa_node) == (
        "NVIDIA A100-SXM4-80GB",
        81920,
        3,
        0,
    )
    assert topo.gpu(2).numa_node is None
    assert topo.link(0, 1) == Link(LinkKind.NVLINK, 12)
    assert topo.link(1, 2).kind is LinkKind.SYS  # SOC is the old spelling of SYS
    assert [(f.gpu, f.kind, f.recovers_at) for f in tf.faults] == [
        (2, "lost", 8.0),
        (1, "xid", None),
    ]
    assert tf.version == "v1"


def test_pci_bus_ids_are_normalized_to_nvmls_eight_digit_upper_case_form(tmp_path: Path) -> None:
    topo = load_topology_file(write(tmp_path, GOOD)).topology()
    assert topo.gpu(1).pci_bus_id == "00000000:0F:00.0"
    assert normalize_pci_bus_id("0000:b7:00.1") == "00000000:B7:00.1"
    assert normalize_pci_bus_id("7:0.0") == "00000000:07:00.0"
    with pytest.raises(ValueError, match="not a PCI bus id"):
        normalize_pci_bus_id("07:00")


def test_json_files_load_like_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(yaml.safe_load(GOOD)), name="x.json")
    assert load_topology_file(path) == load_topology_file(write(tmp_path, GOOD))


def test_a_missing_field_names_the_file_and_key_path(tmp_path: Path) -> None:
    assert problems(tmp_path, edited(gpus__2__minor=...)) == ["gpus[2].minor: field required"]


def test_every_structural_problem_gets_its_own_line(tmp_path: Path) -> None:
    text = edited(gpus__0__bogus=1, gpus__1__memoryMiB="80GB", version="v2", faults__1__xid=...)
    assert problems(tmp_path, text) == [
        "version: input should be 'v1'",
        "gpus[0].bogus: unknown key",
        "gpus[1].memoryMiB: input should be a valid integer",
        "faults[1]: kind xid needs the xid number (e.g. xid: 79)",
    ]


def test_an_unquoted_pci_bus_id_gets_a_hint_to_quote_it(tmp_path: Path) -> None:
    text = GOOD.replace('"00000000:07:00.0"', "00000000:07:00.0")
    (line,) = problems(tmp_path, text)
    assert line.startswith('gpus[0].pciBusId: must be a quoted string like "00000000:07:00.0"')


def test_an_unknown_link_word_names_its_cell(tmp_path: Path) -> None:
    assert problems(tmp_path, GOOD.replace("[NV12, X, SOC]", "[NV12, X, NVX]")) == [
        "links[1][2]: unknown link word 'NVX' (expected X, NV<n>, PIX, PXB, PHB, NODE or SYS)"
    ]


def test_a_matrix_of_the_wrong_shape_says_the_expected_shape(tmp_path: Path) -> None:
    text = edited(links__0=["X", "NV12", "SYS", "SYS"])
    assert problems(tmp_path, text) == [
        "links: matrix is 3x3/4, expected 3x3 (one row and column per GPU)"
    ]
    assert problems(tmp_path, edited(links__2=...)) == [
        "links: matrix is 2x3, expected 3x3 (one row and column per GPU)"
    ]


def test_an_asymmetric_cell_and_a_misplaced_x_are_named(tmp_path: Path) -> None:
    text = edited(links__2=["PIX", "X", "X"])
    assert problems(tmp_path, text) == [
        "links[0][2]: SYS but links[2][0] is PIX; the matrix must be symmetric",
        "links[2][1]: X belongs only on the diagonal",
    ]
    assert problems(tmp_path, edited(links__1=["NV12", "PIX", "SYS"])) == [
        "links[1][1]: the diagonal must be X, got PIX"
    ]


def test_duplicate_index_uuid_minor_and_bus_id_are_each_reported(tmp_path: Path) -> None:
    data = yaml.safe_load(GOOD)
    data["gpus"][2] = dict(data["gpus"][1], index=1)
    data["faults"] = []
    assert problems(tmp_path, yaml.safe_dump(data)) == [
        "gpus[2].index: duplicate 1 (also gpus[1])",
        "gpus[2].uuid: duplicate 'GPU-11111111-1111-1111-1111-111111111111' (also gpus[1])",
        "gpus[2].minor: duplicate 1 (also gpus[1])",
        "gpus[2].pciBusId: duplicate '00000000:0F:00.0' (also gpus[1])",
    ]


def test_gpus_out_of_index_order_are_refused_because_the_matrix_follows_the_list(
    tmp_path: Path,
) -> None:
    text = edited(gpus__0__index=5)
    assert problems(tmp_path, text) == [
        "gpus[1].index: 1 comes after 5; list GPUs by ascending index "
        "(the rows and columns of links follow this order)",
    ]


def test_faults_must_name_a_known_gpu_and_fit_their_kind(tmp_path: Path) -> None:
    text = edited(faults__0__gpu=7, faults__1__recoverAfter=1.0)
    assert problems(tmp_path, text) == [
        "faults[1]: recoverAfter belongs to kind lost, not xid",
    ]
    assert problems(tmp_path, edited(faults__0__gpu=7)) == [
        "faults[0].gpu: no GPU with index 7 (have [0, 1, 2])"
    ]
    assert problems(tmp_path, edited(faults__0__recoveryAction="none")) == [
        "faults[0]: recoveryAction belongs to kind xid, not lost"
    ]
    tf = load_topology_file(write(tmp_path, edited(faults__1__recoveryAction="gpuReset")))
    assert tf.faults[1].recovery_action == "gpuReset"
    assert problems(tmp_path, edited(faults__1__recoveryAction="reboot"))[0].startswith(
        "faults[1].recoveryAction: "
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty (expected gpus and links)"),
        ("- 1\n- 2\n", "expected a mapping with gpus and links, got list"),
    ],
)
def test_an_empty_or_non_mapping_file_is_one_readable_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert problems(tmp_path, text) == [expected]


def test_yaml_syntax_errors_carry_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "gpus: [\nlinks: {")
    with pytest.raises(NvmlError, match=rf"^{path}:\d+:\d+: invalid YAML: "):
        load_topology_file(path)


def test_a_missing_file_is_a_readable_nvml_error(tmp_path: Path) -> None:
    with pytest.raises(NvmlError, match=r"nope\.yaml: cannot read: No such file"):
        load_topology_file(tmp_path / "nope.yaml")


def test_a_topology_round_trips_through_the_file_form(tmp_path: Path) -> None:
    tf = load_topology_file(write(tmp_path, GOOD))
    again = write(tmp_path, yaml.safe_dump(tf.to_data()), name="again.yaml")
    assert load_topology_file(again) == tf
    rebuilt = TopologyFile.from_topology(tf.topology(), tf.faults)
    assert rebuilt.topology() == tf.topology()
    assert rebuilt.faults == tf.faults
